"""The fork server: a single-threaded process started once per Sandbox with the base interpreter
(`-I -S`, empty environment), so that its memory holds no secrets of the caller. It probes which
isolation mechanisms work, then serves jobs from stdin (JSON lines) on `slots` concurrent runs and
answers on stdout (JSON lines), never blocking on either: a client that stops reading only delays
its replies.

It never runs a job itself and never forks one: jails come from the zygote (zygote.py), forked
before the first job was read, so that no jail's memory ever held another job. Each run gets fresh
namespaces; the prepared part is the warm interpreter with the standard library and the harness
already imported. The server enforces the wall clock (through the zygote: SIGKILL of the jail's pid
1 ends its whole pid namespace).

It never sees expected outputs: a job is a program or a solution with test inputs."""

import collections
import fcntl
import glob
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time

from sandbox import cgroups, jail, linux, zygote

# Imported once here so that jobs do not pay for them; the solution finds them in sys.modules.
PRELOAD = ("ast", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal", "enum",
           "fractions", "functools", "hashlib", "heapq", "itertools", "math", "operator", "random", "re",
           "statistics", "string", "textwrap", "typing", "unicodedata")
UID_BASE = 1_900_000
ROOT_PREFIX = "r1sandbox-root-"


class BadRequest(ValueError):
    pass


class Job:
    def __init__(self, request: dict):
        self.request, self.slot, self.started = request, None, None  # set when the zygote starts it
        self.buffers = {"stdout": bytearray(), "stderr": bytearray(), "result": bytearray(), "status": bytearray()}
        self.pipes, self.open_streams, self.killed_for = {}, set(), None
        self.pid = 0
        self.wait_status = None
        self.leftover = self.oom = False
        self.start_error: str | None = None
        self.host_workdir = None


def validate(request) -> dict:
    """A request as the client sends it, or BadRequest naming what is wrong."""
    if type(request) is not dict or type(request.get("id")) is not str:
        raise BadRequest("a request is an object with a string 'id'")
    try:
        jail.check_limits(request.get("timeout_s"), request.get("memory_mb"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    kind = request.get("kind")
    if kind == "harness":
        job = request.get("request")
        if type(job) is not dict or job.get("format") not in ("function_call", "stdio", "assert"):
            raise BadRequest("a harness request needs 'request' with a known format")
    elif kind == "exec":
        argv = request.get("argv")
        if type(argv) is not list or not argv or not all(type(a) is str for a in argv):
            raise BadRequest("an exec request needs 'argv', a non-empty list of strings")
    else:
        raise BadRequest(f"kind={kind!r}: must be 'harness' or 'exec'")
    if type(request.get("stdin", "")) is not str or type(request.get("workdir") or "") is not str:
        raise BadRequest("'stdin' and 'workdir' must be text")
    return request


class Server:
    def __init__(self, config: dict, root: bool):
        self.config, self.root = config, root
        self.selector = selectors.DefaultSelector()
        self.pending = collections.deque()
        self.jobs: dict[str, Job] = {}
        # Jobs handed to the zygote, which runs `slots` of them at once and starts the next one the
        # moment a run ends. Bounded, as each holds a few descriptors until it runs.
        self.max_handed = 4 * config["slots"]
        _remove_stale_roots()
        self.mountpoint = tempfile.mkdtemp(prefix=ROOT_PREFIX)
        # Held while the server lives: a later server removes the mount point once nobody holds it.
        self.mountpoint_lock = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self.mountpoint_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        disabled = set(config.get("disable", ()))
        self.cgroup_version, self.cgroup_note = cgroups.detect() if root else (None, "not root")
        if "cgroup" in disabled:
            self.cgroup_version, self.cgroup_note = None, "disabled"
        self.slot_cgroups = {}
        self.slot_net_ns: dict[int, int] = {}
        self.root_ns = -1
        self.level = "none"
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.landlock_abi = 0 if "landlock" in disabled else linux.landlock_abi()
        self.seccomp = "seccomp" not in disabled and linux.seccomp_supported()
        self.zygote_pid, self.zygote = 0, None
        self.reading = True

    # --- start-up -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything the jails share, then the zygote, forked before any job is read."""
        if self.cgroup_version:
            cgroups.remove_stale()
            for slot in range(self.config["slots"]):
                self.slot_cgroups[slot] = cgroups.SlotCgroup(self.cgroup_version, f"{os.getpid()}-{slot}",
                                                             self.config["processes"], self.config["cpus"])
        self.namespace_error = self.make_network_namespaces() or self.prepare_root()
        prefixes = self.config["prefixes"]
        setup = {
            "root": self.root, "own_pid_ns": os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC),
            "root_ns": self.root_ns, "net_ns": self.slot_net_ns,
            "uid_base": UID_BASE + (os.getpid() % 4096) * jail.MAX_SLOTS,
            "slots": self.config["slots"], "cgroups": self.slot_cgroups,
            "workdir_mb": self.config["workdir_mb"], "processes": self.config["processes"],
            "landlock_abi": self.landlock_abi,
            "seccomp_program": linux.seccomp_program() if self.seccomp else b"",
            "env": {"PATH": ":".join([f"{p}/bin" for p in prefixes] + ["/usr/local/bin", "/usr/bin", "/bin"]),
                    "HOME": "/work", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
        }
        self.zygote_pid, self.zygote = zygote.start(setup)
        self.selector.register(self.zygote, selectors.EVENT_READ, "zygote")

    def probe(self) -> dict:
        """Which mechanisms this host offers, and the strongest level whose no-op job succeeds.
        "full" needs all of them: cgroup memory+pids, seccomp and Landlock."""
        mechanisms = {
            "root": self.root,
            "bubblewrap": shutil.which("bwrap"),
            "unshare_binary": shutil.which("unshare"),
            "cgroup": self.cgroup_version,
            "cgroup_note": self.cgroup_note,
            "seccomp": self.seccomp,
            "landlock_abi": self.landlock_abi,
            "cgroup_cpu": any(group.cpu_limited for group in self.slot_cgroups.values()),
        }
        failures = {}
        for level in jail.LEVELS:
            missing = [name for name, ok in (("cgroup memory+pids", self.cgroup_version), ("seccomp", self.seccomp),
                                             ("Landlock", self.landlock_abi)) if not ok]
            if level == "full" and missing:
                failures[level] = "needs " + ", ".join(missing)
                continue
            if level != "none" and self.namespace_error:
                failures[level] = f"cannot prepare the namespaces: {self.namespace_error}"
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
        stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
        os.set_blocking(stdin, False)
        os.set_blocking(stdout, False)
        self.selector.register(stdin, selectors.EVENT_READ, "requests")

        def reply(message: dict) -> None:
            self.outbuf += (json.dumps(message) + "\n").encode()

        while self.reading or self.jobs or self.pending or self.outbuf:
            self.step(reply)
            self.flush(stdout)

    def flush(self, fd: int) -> None:
        """Write what the client will take now; wait for it to be writable only while replies queue."""
        if self.outbuf:
            try:
                del self.outbuf[:os.write(fd, self.outbuf)]
            except BlockingIOError:
                pass
            except BrokenPipeError:  # the client is gone
                self.outbuf.clear()
                self.stop_reading()
        want = selectors.EVENT_WRITE if self.outbuf else 0
        registered = self.selector.get_map().get(fd)
        if want and registered is None:
            self.selector.register(fd, want, "replies")
        elif not want and registered is not None:
            self.selector.unregister(fd)

    def step(self, reply) -> None:
        refused = False
        while self.pending and len(self.jobs) < self.max_handed:
            request = self.pending.popleft()
            try:
                self.start(request)
            except OSError as exc:  # e.g. out of descriptors: this job fails, loudly, and nothing leaks
                reply(self.failure(request, f"start: {exc!r}"))
                refused = True
        deadlines = [j.started + j.request["timeout_s"] for j in self.jobs.values()
                     if j.killed_for is None and j.started is not None]
        timeout = 0.0 if refused else max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for key, _ in self.selector.select(timeout):
            if key.data == "requests":
                self.read_requests(key.fd, reply)
            elif key.data == "zygote":
                self.read_zygote(reply)
            elif key.data == "replies":
                pass  # writable: the caller flushes
            else:
                self.read_job(*key.data)
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.killed_for is None and job.started is not None and now > job.started + job.request["timeout_s"]:
                self.kill(job, "timeout")
            if job.wait_status is not None:
                reply(self.finish(job))
            elif job.start_error is not None:
                self.release(job)
                reply(self.failure(job.request, job.start_error))

    def failure(self, request: dict, error: str) -> dict:
        return {"id": request.get("id", ""), "status": "sandbox_error", "error": error, "stdout": "", "stderr": "",
                "result": "", "wall_s": 0.0, "exit_code": None, "signal": None, "level": self.level}

    def read_requests(self, fd: int, reply) -> None:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return
        if not chunk:  # the caller is gone: stop taking work, end what runs
            self.selector.unregister(fd)
            self.stop_reading()
            return
        self.inbuf += chunk
        *lines, rest = self.inbuf.split(b"\n")
        self.inbuf = bytearray(rest)
        for line in lines:
            if not line.strip():
                continue
            request = None
            try:
                request = json.loads(line)
                self.pending.append(validate(request))
            except (ValueError, RecursionError) as exc:  # a bad request fails alone; the server goes on
                if type(request) is dict and type(request.get("id")) is str:
                    reply(self.failure(request, f"bad request: {exc}"))
                else:
                    print(f"sandbox server: dropped a malformed request: {exc}", file=sys.stderr)

    def stop_reading(self) -> None:
        self.reading = False
        self.pending.clear()
        for job in self.jobs.values():
            self.kill(job, "shutdown")

    def read_zygote(self, reply) -> None:
        try:
            data = self.zygote.recv(1 << 16)
        except BlockingIOError:
            return
        if not data:
            raise RuntimeError("the zygote died; the server cannot fork a clean one and stops")
        message = json.loads(data)
        job = self.jobs.get(message["job"])
        if job is None:
            return
        if "error" in message:  # released after this round of events, whose list may still name its pipes
            job.start_error = message["error"]
        elif "pid" in message:
            job.pid, job.slot, job.started = message["pid"], message["slot"], time.monotonic()
            if job.killed_for:  # killed before the zygote had started it
                self.zygote.send(json.dumps({"kill": message["job"]}).encode())
        else:
            job.wait_status, job.leftover, job.oom = message["status"], message["leftover"], message["oom"]

    def start(self, request: dict) -> None:
        job = Job(request)
        job.host_workdir = tempfile.mkdtemp(prefix="r1sandbox-work-") if self.level == "none" else None
        if request["kind"] == "harness":
            job_data = dict(request["request"])
            # The test code goes to the checker only (harness.py), never into the candidate's memory.
            check = {"check_code": job_data.pop("check_code", ""), "prompt": job_data.pop("check_prompt", "")}
        else:
            job_data, check = {"argv": request["argv"]}, {}
        pipes, memfds = {}, {}
        try:
            for name in ("stdout", "stderr", "result", "status"):
                pipes[name] = os.pipe()
            for name in ("stdin", "request", "check"):
                memfds[name] = os.memfd_create(name)
            for name, text in (("stdin", request.get("stdin", "")), ("request", json.dumps(job_data)),
                               ("check", json.dumps(check) if check else "")):
                _write_all(memfds[name], text.encode())
                os.lseek(memfds[name], 0, os.SEEK_SET)
            fds = [memfds[n] if n in memfds else pipes[n][1] for n in jail.STREAMS]
            message = {"start": request["id"], "level": self.level, "kind": request["kind"],
                       "timeout_s": request["timeout_s"], "memory_mb": request["memory_mb"],
                       "host_workdir": job.host_workdir, "copy_from": request.get("workdir")}
            socket.send_fds(self.zygote, [json.dumps(message).encode()], fds)
        except OSError:
            for r, _ in pipes.values():
                os.close(r)
            if job.host_workdir:
                shutil.rmtree(job.host_workdir, ignore_errors=True)
            raise
        finally:  # the zygote has its own copies now (or none, on failure)
            for fd in [*memfds.values(), *(w for _, w in pipes.values())]:
                os.close(fd)
        for name, (r, _) in pipes.items():
            os.set_blocking(r, False)
            self.selector.register(r, selectors.EVENT_READ, (job, name))
            job.pipes[name] = r
            job.open_streams.add(name)
        self.jobs[request["id"]] = job

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
        caps = {"result": self.config["result_cap"], "status": 1 << 16}
        total = len(job.buffers["stdout"]) + len(job.buffers["stderr"])
        if len(job.buffers[name]) > caps.get(name, 1 << 62) or total > self.config["output_cap"]:
            del job.buffers[name][caps.get(name, self.config["output_cap"]):]  # memory stays bounded
            if job.killed_for is None:
                self.kill(job, "output_limit")
        return True

    def kill(self, job: Job, why: str) -> None:
        """Through the zygote, which alone knows whether the job still holds its slot (and its
        cgroup): it may have ended, and the slot gone to the next job, a moment ago."""
        job.killed_for = job.killed_for or why
        if job.wait_status is None:
            self.zygote.send(json.dumps({"kill": job.request["id"]}).encode())

    def release(self, job: Job) -> None:
        for name in list(job.open_streams):
            self.selector.unregister(job.pipes[name])
        for fd in job.pipes.values():
            os.close(fd)
        if job.host_workdir:
            shutil.rmtree(job.host_workdir, ignore_errors=True)
        del self.jobs[job.request["id"]]

    def finish(self, job: Job) -> dict:
        """The jail has exited (and been reaped): collect what is left in the pipes, and leave
        nothing running."""
        for name in list(job.open_streams):
            cap = self.config["result_cap"] if name == "result" else self.config["output_cap"]
            while self.read_job(job, name) and len(job.buffers[name]) < cap:
                pass
        self.release(job)
        return self.describe(job)

    def describe(self, job: Job) -> dict:
        text = lambda name: job.buffers[name].decode("utf-8", "replace")  # noqa: E731
        setup_error = None
        for line in job.buffers["status"].splitlines():
            try:
                setup_error = setup_error or json.loads(line).get("setup_error")
            except (ValueError, AttributeError):
                setup_error = setup_error or "unreadable setup report"
        exited = os.WIFEXITED(job.wait_status)
        reply = {"id": job.request["id"], "stdout": text("stdout")[: self.config["output_cap"]],
                 "stderr": text("stderr")[: self.config["output_cap"]], "result": text("result"),
                 "wall_s": time.monotonic() - (job.started or time.monotonic()),
                 "exit_code": os.WEXITSTATUS(job.wait_status) if exited else None,
                 "signal": None if exited else os.WTERMSIG(job.wait_status),
                 "leftover_processes": job.leftover, "level": self.level}
        if setup_error:
            reply.update(status="sandbox_error", error=str(setup_error)[:2000])
        elif job.killed_for:
            reply["status"] = job.killed_for
        elif job.oom:
            reply["status"] = "memory"
        else:
            reply["status"] = "exited" if exited else "signaled"
        return reply

    def close(self) -> None:
        if self.zygote_pid:
            try:
                os.kill(self.zygote_pid, signal.SIGKILL)
                os.waitpid(self.zygote_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for group in self.slot_cgroups.values():
            group.remove()
        shutil.rmtree(self.mountpoint, ignore_errors=True)
        os.close(self.mountpoint_lock)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _remove_stale_roots() -> None:
    """The empty mount points left by servers that were killed (their mounts lived in a namespace
    that died with them): any that no live server holds locked."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{ROOT_PREFIX}*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # a live server holds it
            pass
        finally:
            os.close(fd)


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
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up (cgroups, mount point) on TERM too
    # Every run holds a few descriptors here; a host with many cores (many slots) must not hit the
    # usual soft limit of 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    root = os.geteuid() == 0
    if not root:
        _enter_own_namespaces()
    for module in PRELOAD:
        __import__(module)
    server = Server(config, root)
    try:
        server.prepare()
        hello = server.probe()
        sys.stdout.buffer.write((json.dumps(hello) + "\n").encode())
        sys.stdout.buffer.flush()
        server.serve()
    finally:
        server.close()
