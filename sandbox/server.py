"""The fork server: a single-threaded process started once per Sandbox with the base interpreter
(`-I -S`, empty environment), so that forking it is cheap and safe and its memory holds no secrets
of the caller. It probes which isolation mechanisms work, then serves jobs from stdin (JSON lines)
on `slots` concurrent runs and answers on stdout (JSON lines). Each run gets fresh namespaces; the
prepared part is the warm interpreter with the standard library and the harness already imported.

It never sees expected outputs: a job is a program or a solution with test inputs."""

import collections
import json
import os
import selectors
import shutil
import signal
import sys
import tempfile
import time

from sandbox import cgroups, harness, jail, linux

# Imported once here so that jobs do not pay for them; the solution finds them in sys.modules.
PRELOAD = ("ast", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal", "enum",
           "fractions", "functools", "hashlib", "heapq", "itertools", "math", "operator", "random", "re",
           "statistics", "string", "textwrap", "typing", "unicodedata")
UID_BASE = 1_900_000
KILL_GRACE_S = 2.0


class Job:
    def __init__(self, request: dict, slot: int):
        self.request, self.slot, self.started = request, slot, time.monotonic()
        self.buffers = {"stdout": bytearray(), "stderr": bytearray(), "result": bytearray(), "status": bytearray()}
        self.pipes, self.open_streams, self.killed_for = {}, set(), None
        self.pid = 0
        self.oom_before = 0
        self.host_workdir = None


class Server:
    def __init__(self, config: dict):
        self.config = config
        self.selector = selectors.DefaultSelector()
        self.pending = collections.deque()
        self.jobs: dict[int, Job] = {}
        self.free_slots = list(range(config["slots"]))
        self.mountpoint = tempfile.mkdtemp(prefix="r1sandbox-root-")
        self.cgroup_version, self.cgroup_note = cgroups.detect() if os.geteuid() == 0 else (None, "not root")
        self.slot_cgroups = {}
        self.level = "none"
        self.inbuf = bytearray()
        self.landlock_abi, self.seccomp = linux.landlock_abi(), linux.seccomp_supported()

    # --- start-up -----------------------------------------------------------------------------

    def probe(self) -> dict:
        """Which mechanisms this host offers, and the strongest level whose no-op job succeeds."""
        mechanisms = {
            "root": os.geteuid() == 0,
            "bubblewrap": shutil.which("bwrap"),
            "unshare_binary": shutil.which("unshare"),
            "cgroup": self.cgroup_version,
            "cgroup_note": self.cgroup_note,
            "seccomp": self.seccomp,
            "landlock_abi": self.landlock_abi,
        }
        if self.cgroup_version:
            for slot in range(self.config["slots"]):
                group = cgroups.SlotCgroup(self.cgroup_version, f"{os.getpid()}-{slot}", self.config["processes"])
                self.slot_cgroups[slot] = group
        failures = {}
        for level in jail.LEVELS:
            if level == "full" and not (self.cgroup_version and mechanisms["seccomp"]):
                failures[level] = "needs cgroup memory+pids and seccomp"
                continue
            self.level = level
            reply = self.run_now({"id": "probe", "kind": "harness", "timeout_s": 5.0, "memory_mb": 256,
                                  "request": {"format": "function_call", "source": "def f():\n    return 1\n",
                                              "entry_point": "f", "inputs": [[]]}})
            if reply["status"] == "exited" and reply["exit_code"] == 0 and '"value": 1' in reply["result"]:
                break
            failures[level] = reply.get("error") or reply["stderr"][-500:] or reply["status"]
        mechanisms["namespaces"] = self.level != "none"
        return {"level": self.level, "mechanisms": mechanisms, "failures": failures}

    def run_now(self, request: dict) -> dict:
        replies = []
        self.pending.append(request)
        while not replies:
            self.step(replies.append)
        return replies[0]

    # --- the loop -----------------------------------------------------------------------------

    def serve(self) -> None:
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        self.selector.register(stdin, selectors.EVENT_READ, None)
        out = sys.stdout.buffer

        def reply(message: dict) -> None:
            out.write((json.dumps(message) + "\n").encode())
            out.flush()

        self.reading = True
        while self.reading or self.jobs or self.pending:
            self.step(reply)

    def step(self, reply) -> None:
        while self.pending and self.free_slots:
            self.start(self.pending.popleft(), self.free_slots.pop())
        deadlines = [j.started + j.request["timeout_s"] + KILL_GRACE_S for j in self.jobs.values()]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self.read_requests(key.fd)
            else:
                self.read_job(*key.data)
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.killed_for is None and now > job.started + job.request["timeout_s"] + KILL_GRACE_S:
                self.kill(job, "timeout")
            if "status" not in job.open_streams:
                reply(self.finish(job))
        self.reap()

    def read_requests(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return
        if not chunk:  # the caller is gone: stop taking work, end what runs
            self.selector.unregister(fd)
            self.reading = False
            self.pending.clear()
            for job in self.jobs.values():
                self.kill(job, "shutdown")
            return
        self.inbuf += chunk
        *lines, rest = self.inbuf.split(b"\n")
        self.inbuf = bytearray(rest)
        self.pending.extend(json.loads(line) for line in lines if line.strip())

    def start(self, request: dict, slot: int) -> None:
        job = Job(request, slot)
        pipes = {name: os.pipe() for name in ("stdout", "stderr", "result", "status")}
        stdin = os.memfd_create("stdin")
        os.write(stdin, request.get("stdin", "").encode())
        os.lseek(stdin, 0, os.SEEK_SET)
        group = self.slot_cgroups.get(slot)
        if group and self.level != "none":
            group.set_memory(request["memory_mb"] << 20)
            job.oom_before = group.oom_kills()
        spec = self.spec(request, slot, group)
        job.host_workdir = spec.get("host_workdir")
        if request["kind"] == "harness":
            target = lambda: harness.main(request["request"])  # noqa: E731
        else:
            target = lambda: os.execvpe(request["argv"][0], request["argv"], spec["env"])  # noqa: E731
        job.pid = jail.spawn(spec, stdin, pipes["stdout"][1], pipes["stderr"][1], pipes["result"][1],
                             pipes["status"][1], target)
        os.close(stdin)
        for name, (r, w) in pipes.items():
            os.close(w)
            os.set_blocking(r, False)
            self.selector.register(r, selectors.EVENT_READ, (job, name))
            job.pipes[name] = r
            job.open_streams.add(name)
        self.jobs[job.pid] = job

    def spec(self, request: dict, slot: int, group) -> dict:
        cfg = self.config
        memory = request["memory_mb"] << 20
        spec = {
            "level": self.level, "root": os.geteuid() == 0, "server_pid": os.getpid(),
            "uid": UID_BASE + slot, "timeout_s": float(request["timeout_s"]),
            "cgroup_procs": group.procs_files if group and self.level != "none" else [],
            "mountpoint": self.mountpoint, "prefixes": cfg["prefixes"], "hide": cfg["hide"],
            "workdir_bytes": cfg["workdir_mb"] << 20, "copy_from": request.get("workdir"),
            "address_space_bytes": memory + (512 << 20), "file_size_bytes": cfg["workdir_mb"] << 20,
            "open_files": 64, "processes": cfg["processes"],
            "landlock_abi": self.landlock_abi, "seccomp": self.seccomp,
            "env": {"PATH": ":".join([f"{p}/bin" for p in cfg["prefixes"]] + ["/usr/local/bin", "/usr/bin", "/bin"]),
                    "HOME": "/work", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
        }
        if self.level == "none":
            spec["host_workdir"] = tempfile.mkdtemp(prefix="r1sandbox-work-")
            spec["env"]["HOME"] = spec["host_workdir"]
        return spec

    def read_job(self, job: Job, name: str) -> bool:
        """Read one chunk; False when nothing more is there for now."""
        fd = job.pipes[name]
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return False
        if not chunk:
            self.selector.unregister(fd)
            job.open_streams.discard(name)
            return False
        job.buffers[name] += chunk
        caps = {"result": self.config["result_cap"]}
        total = len(job.buffers["stdout"]) + len(job.buffers["stderr"])
        if job.killed_for is None and (len(job.buffers[name]) > caps.get(name, 1 << 62)
                                       or total > self.config["output_cap"]):
            self.kill(job, "output_limit")
        return True

    def kill(self, job: Job, why: str) -> None:
        job.killed_for = job.killed_for or why
        try:
            os.kill(job.pid, signal.SIGKILL)  # the monitor; the jail follows by its parent-death signal
        except ProcessLookupError:
            pass
        group = self.slot_cgroups.get(job.slot)
        if group:
            group.kill_all()

    def finish(self, job: Job) -> dict:
        """The monitor has exited: collect what is left in the pipes, and leave nothing running."""
        for name in list(job.open_streams):
            while self.read_job(job, name) and len(job.buffers[name]) <= self.config["result_cap"]:
                pass
            if name in job.open_streams:
                self.selector.unregister(job.pipes[name])
        for fd in job.pipes.values():
            os.close(fd)
        group = self.slot_cgroups.get(job.slot)
        leftover = bool(group and group.procs())
        if group and not group.kill_all():
            raise RuntimeError(f"slot {job.slot}: processes survive SIGKILL: {group.procs()}")
        if job.host_workdir:
            shutil.rmtree(job.host_workdir, ignore_errors=True)
        del self.jobs[job.pid]
        self.free_slots.append(job.slot)
        return self.describe(job, leftover, group)

    def describe(self, job: Job, leftover: bool, group) -> dict:
        text = lambda name: job.buffers[name].decode("utf-8", "replace")  # noqa: E731
        statuses = [json.loads(line) for line in job.buffers["status"].splitlines() if line.strip()]
        status = {k: v for s in statuses for k, v in s.items()}
        oom = bool(group and group.oom_kills() > job.oom_before)
        reply = {"id": job.request["id"], "stdout": text("stdout")[: self.config["output_cap"]],
                 "stderr": text("stderr")[: self.config["output_cap"]], "result": text("result"),
                 "wall_s": time.monotonic() - job.started, "exit_code": status.get("exit"),
                 "signal": status.get("signal"), "leftover_processes": leftover, "level": self.level}
        if "setup_error" in status:
            reply.update(status="sandbox_error", error=status["setup_error"])
        elif job.killed_for:
            reply["status"] = job.killed_for
        elif status.get("timeout"):
            reply["status"] = "timeout"
        elif oom:
            reply["status"] = "memory"
        elif "exit" in status:
            reply["status"] = "exited"
        elif "signal" in status:
            reply["status"] = "signaled"
        else:
            reply.update(status="sandbox_error", error="the monitor ended without a status")
        return reply

    def reap(self) -> None:
        """We are the child subreaper: orphans of jobs end up here and must not stay zombies."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def close(self) -> None:
        for group in self.slot_cgroups.values():
            group.remove()
        shutil.rmtree(self.mountpoint, ignore_errors=True)


def main() -> None:
    config = json.loads(sys.argv[1])
    os.umask(0o022)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    for module in PRELOAD:
        __import__(module)
    server = Server(config)
    try:
        hello = server.probe()
        sys.stdout.buffer.write((json.dumps(hello) + "\n").encode())
        sys.stdout.buffer.flush()
        server.serve()
    finally:
        server.close()
