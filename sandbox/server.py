"""The fork server: a single-threaded process started once per Sandbox with the base interpreter
(`-I -S`, empty environment), so that forking it is cheap and safe and its memory holds no secrets
of the caller. It probes which isolation mechanisms work, then serves jobs from stdin (JSON lines)
on `slots` concurrent runs and answers on stdout (JSON lines). Each run gets fresh namespaces; the
prepared part is the warm interpreter with the standard library and the harness already imported.
The server is the jail's parent: it enforces the wall clock (SIGKILL of the jail's pid 1 ends the
whole pid namespace) and reads the exit status itself.

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


class Job:
    def __init__(self, request: dict, slot: int):
        self.request, self.slot, self.started = request, slot, time.monotonic()
        self.buffers = {"stdout": bytearray(), "stderr": bytearray(), "result": bytearray(), "status": bytearray()}
        self.pipes, self.open_streams, self.killed_for = {}, set(), None
        self.pid = 0
        self.pidfd = -1
        self.wait_status = None
        self.host_workdir = None


class Server:
    def __init__(self, config: dict, root: bool):
        self.config, self.root = config, root
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.pidfd = os.pidfd_open(os.getpid())  # the jail polls it: is the server still there?
        self.selector = selectors.DefaultSelector()
        self.pending = collections.deque()
        self.jobs: dict[int, Job] = {}
        self.free_slots = list(range(config["slots"]))
        self.mountpoint = tempfile.mkdtemp(prefix="r1sandbox-root-")
        self.cgroup_version, self.cgroup_note = cgroups.detect() if root else (None, "not root")
        self.slot_cgroups = {}
        self.slot_net_ns: dict[int, int] = {}
        self.root_ns = -1
        self.level = "none"
        self.inbuf = bytearray()
        self.landlock_abi, self.seccomp = linux.landlock_abi(), linux.seccomp_supported()
        self.seccomp_program = linux.seccomp_program() if self.seccomp else b""

    # --- start-up -----------------------------------------------------------------------------

    def probe(self) -> dict:
        """Which mechanisms this host offers, and the strongest level whose no-op job succeeds."""
        mechanisms = {
            "root": self.root,
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
        namespace_error = self.make_network_namespaces() or self.prepare_root()
        failures = {}
        for level in jail.LEVELS:
            if level == "full" and not (self.cgroup_version and mechanisms["seccomp"]):
                failures[level] = "needs cgroup memory+pids and seccomp"
                continue
            if level != "none" and namespace_error:
                failures[level] = f"cannot prepare the namespaces: {namespace_error}"
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

    def make_network_namespaces(self) -> str | None:
        """One empty network namespace per slot (only a loopback device, down), kept open here and
        entered by each of the slot's jails: creating and tearing down one per run costs more than
        the rest of the namespaces together. Nothing a run could leave in it survives the run: the
        jail can neither configure it (no capability over it) nor open other sockets than AF_UNIX
        (seccomp), and its sockets close with its processes. None, or why it failed."""
        try:
            own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                for slot in range(self.config["slots"]):
                    linux.unshare(linux.CLONE_NEWNET)
                    self.slot_net_ns[slot] = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                    linux.setns(own, linux.CLONE_NEWNET)
            finally:
                os.close(own)
        except OSError as exc:
            return repr(exc)
        return None

    def prepare_root(self) -> str | None:
        """Build the jails' read-only root once (jail.build_root), in a mount namespace kept open
        here: each jail enters it and takes a private copy, and only mounts its own /proc and /work.
        None, or why it failed."""
        own = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.unshare(linux.CLONE_NEWNS)
            prepared = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            try:
                jail.build_root(self.mountpoint, self.config["prefixes"], self.config["hide"], not self.root)
            except BaseException:
                os.close(prepared)
                raise
            finally:
                linux.setns(own, linux.CLONE_NEWNS)  # back to the host's tree, root and cwd
            self.root_ns = prepared
        except OSError as exc:
            return repr(exc)
        finally:
            os.close(own)
        return None

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

        self.reading = True
        while self.reading or self.jobs or self.pending:
            self.step(reply)
            out.flush()  # the replies of one step in one write

    def step(self, reply) -> None:
        refused = False
        while self.pending and self.free_slots:
            request, slot = self.pending.popleft(), self.free_slots.pop()
            try:
                self.start(request, slot)
            except OSError as exc:  # e.g. namespaces refused while probing a level
                self.free_slots.append(slot)
                refused = True
                reply({"id": request["id"], "status": "sandbox_error", "error": f"start: {exc!r}", "stdout": "",
                       "stderr": "", "result": "", "wall_s": 0.0, "exit_code": None, "signal": None,
                       "level": self.level})
        deadlines = [j.started + j.request["timeout_s"] for j in self.jobs.values() if j.killed_for is None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.0 if refused else None
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self.read_requests(key.fd)
            elif key.data[1] == "exit":
                self.reap()
            else:
                self.read_job(*key.data)
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.killed_for is None and now > job.started + job.request["timeout_s"]:
                self.kill(job, "timeout")
            if job.wait_status is not None:
                reply(self.finish(job))

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
        group = self.slot_cgroups.get(slot)
        if group and self.level != "none":
            group.set_memory(request["memory_mb"] << 20)
        spec = self.spec(request, slot, group)
        job.host_workdir = spec.get("host_workdir")
        if request["kind"] == "harness":
            target = lambda: harness.main(request["request"])  # noqa: E731
        else:
            target = lambda: os.execvpe(request["argv"][0], request["argv"], spec["env"])  # noqa: E731
        pipes = {name: os.pipe() for name in ("stdout", "stderr", "result", "status")}
        stdin = os.memfd_create("stdin")
        try:
            os.write(stdin, request.get("stdin", "").encode())
            os.lseek(stdin, 0, os.SEEK_SET)
            job.pid = jail.spawn(spec, stdin, pipes["stdout"][1], pipes["stderr"][1], pipes["result"][1],
                                 pipes["status"][1], target)
        except OSError:
            for fd in [stdin, *(fd for pair in pipes.values() for fd in pair)]:
                os.close(fd)
            if job.host_workdir:
                shutil.rmtree(job.host_workdir, ignore_errors=True)
            raise
        os.close(stdin)
        job.pidfd = os.pidfd_open(job.pid)
        self.selector.register(job.pidfd, selectors.EVENT_READ, (job, "exit"))
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
            "level": self.level, "root": self.root, "own_pid_ns": self.own_pid_ns, "server_pidfd": self.pidfd,
            "net_ns": self.slot_net_ns.get(slot, -1), "root_ns": self.root_ns,
            "uid": UID_BASE + slot, "timeout_s": float(request["timeout_s"]),
            "cgroup_procs": group.procs_files if group and self.level != "none" else [],
            "workdir_bytes": cfg["workdir_mb"] << 20, "copy_from": request.get("workdir"),
            "address_space_bytes": memory + (512 << 20), "file_size_bytes": cfg["workdir_mb"] << 20,
            "open_files": 64, "processes": cfg["processes"],
            "landlock_abi": self.landlock_abi, "seccomp_program": self.seccomp_program,
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
        if job.wait_status is None:  # the pid is ours until we reap it: no reuse race
            # pid 1 of its namespace: the kernel ends every other process in it. At level "none"
            # its process group too (the cgroup below catches the rest).
            os.kill(job.pid, signal.SIGKILL)
            if self.level == "none":
                try:
                    os.killpg(job.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        group = self.slot_cgroups.get(job.slot)
        if group:
            group.kill_all()

    def finish(self, job: Job) -> dict:
        """The jail has exited (and been reaped): collect what is left in the pipes, and leave
        nothing running."""
        for name in list(job.open_streams):
            while self.read_job(job, name) and len(job.buffers[name]) <= self.config["result_cap"]:
                pass
            if name in job.open_streams:
                self.selector.unregister(job.pipes[name])
        for fd in job.pipes.values():
            os.close(fd)
        self.selector.unregister(job.pidfd)
        os.close(job.pidfd)
        group = self.slot_cgroups.get(job.slot)
        leftover = bool(group and group.procs())
        if leftover and not group.kill_all():
            raise RuntimeError(f"slot {job.slot}: processes survive SIGKILL: {group.procs()}")
        if job.host_workdir:
            shutil.rmtree(job.host_workdir, ignore_errors=True)
        del self.jobs[job.pid]
        self.free_slots.append(job.slot)
        return self.describe(job, leftover, group)

    def describe(self, job: Job, leftover: bool, group) -> dict:
        text = lambda name: job.buffers[name].decode("utf-8", "replace")  # noqa: E731
        statuses = [json.loads(line) for line in job.buffers["status"].splitlines() if line.strip()]
        setup_error = next((s["setup_error"] for s in statuses if "setup_error" in s), None)
        oom = bool(group and group.new_oom_kills())
        exited = os.WIFEXITED(job.wait_status)
        reply = {"id": job.request["id"], "stdout": text("stdout")[: self.config["output_cap"]],
                 "stderr": text("stderr")[: self.config["output_cap"]], "result": text("result"),
                 "wall_s": time.monotonic() - job.started,
                 "exit_code": os.WEXITSTATUS(job.wait_status) if exited else None,
                 "signal": None if exited else os.WTERMSIG(job.wait_status),
                 "leftover_processes": leftover, "level": self.level}
        if setup_error:
            reply.update(status="sandbox_error", error=setup_error)
        elif job.killed_for:
            reply["status"] = job.killed_for
        elif oom:
            reply["status"] = "memory"
        else:
            reply["status"] = "exited" if exited else "signaled"
        return reply

    def reap(self) -> None:
        """Collect the exit status of jails that ended. We are also the child subreaper: orphans
        (at level "none") end up here and must not stay zombies."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.jobs:
                self.jobs[pid].wait_status = status

    def close(self) -> None:
        for group in self.slot_cgroups.values():
            group.remove()
        shutil.rmtree(self.mountpoint, ignore_errors=True)


def _enter_own_namespaces() -> None:
    """Not root: become pid 1 of a new user + pid namespace, so that the server holds the
    capabilities to give each jail a pid namespace and to step back into its own afterwards. If the
    host refuses, the probe finds out (the namespace levels fail)."""
    try:
        linux.enter_user_namespace()
        # Its own network and mount namespaces too, which it may then leave and re-enter.
        linux.unshare(linux.CLONE_NEWPID | linux.CLONE_NEWNET | linux.CLONE_NEWNS)
    except OSError:
        return
    pid = os.fork()
    if pid:  # stays the caller's child until the server ends, and ends with it
        os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 0xFF)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)


def main() -> None:
    config = json.loads(sys.argv[1])
    os.umask(0o022)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    root = os.geteuid() == 0
    if not root:
        _enter_own_namespaces()
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    for module in PRELOAD:
        __import__(module)
    server = Server(config, root)
    try:
        hello = server.probe()
        sys.stdout.buffer.write((json.dumps(hello) + "\n").encode())
        sys.stdout.buffer.flush()
        server.serve()
    finally:
        server.close()
