"""The zygote: the process every jail is forked from.

The fork server (server.py) reads every job: other completions' solutions and test inputs sit in its
memory, live or freed. A jail forked from it could read them back (gc.get_objects(), its own heap
through /proc/self/mem) and copy a sibling's answer. So the server forks this process once, at
start-up, before it has read any job, and never forks a jail itself. The zygote keeps only the
prepared state (warm interpreter, namespaces, the read-only root) and receives, per job, a few
numbers and file descriptors over a socket; the jail reads its own job from one of them after it is
sealed, and writes its output straight to the server's pipes. Nothing of a job passes through here.

    server ──socket (numbers + fds)──► zygote ─fork─► jail ──pipes──► server

The zygote also runs the pool: the server hands it jobs as they come (up to a bound), and it starts
the next one on a slot the moment the slot's run has ended and its cgroup is empty, with no round
trip to the server in between. Slots, their cgroups (memory limit, leftover processes, OOM count)
and kills are therefore the zygote's business: only it knows whether a job still holds its slot.

Messages (JSON, one per SOCK_SEQPACKET datagram):
  server → zygote  {"start": id, "level", "kind", "timeout_s", "memory_mb", "host_workdir", "copy_from"}
                   with the job's fds in jail.STREAMS order;  {"kill": id}
  zygote → server  {"job": id, "pid": pid, "slot": slot} | {"job": id, "error": text};
                   {"job": id, "status": wait status, "leftover": bool, "oom": bool}
"""

import collections
import gc
import json
import os
import selectors
import signal
import socket

from sandbox import harness, jail, linux


class Zygote:
    def __init__(self, sock: socket.socket, setup: dict):
        self.sock, self.setup = sock, setup
        self.pidfd = os.pidfd_open(os.getpid())  # each jail polls it: is the zygote still there?
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, tuple[str, int, dict, int]] = {}  # pid -> (job id, pidfd, request, slot)
        self.pids: dict[str, int] = {}                              # job id -> pid
        self.queue: collections.deque = collections.deque()         # (request, fds) waiting for a slot
        self.free_slots = list(range(setup["slots"]))

    def serve(self) -> None:
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        while True:
            for key, _ in self.selector.select():
                if key.data is not None:
                    self.reap()
                    continue
                message, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, len(jail.STREAMS))
                if not message:  # the server is gone; our jails die with us (parent-death signal)
                    return
                request = json.loads(message)
                if "kill" in request:
                    self.kill(request["kill"])
                else:
                    self.queue.append((request, fds))
                    self.dispatch()

    def send(self, message: dict) -> None:
        self.sock.send(json.dumps(message).encode())

    def dispatch(self) -> None:
        while self.queue and self.free_slots:
            request, fds = self.queue.popleft()
            self.start(request, fds, self.free_slots.pop())

    def start(self, request: dict, fds: list[int], slot: int) -> None:
        job = request["start"]
        group = self.setup["cgroups"].get(slot) if request["level"] != "none" else None
        try:
            if len(fds) != len(jail.STREAMS):
                raise OSError(f"expected {len(jail.STREAMS)} descriptors, got {len(fds)}")
            if group:
                group.set_memory(int(request["memory_mb"]) << 20)
            pid = jail.spawn(self.spec(request, slot), dict(zip(jail.STREAMS, fds)), _target(request["kind"]))
        except OSError as exc:  # e.g. namespaces refused while probing a level
            self.free_slots.append(slot)
            self.send({"job": job, "error": f"start: {exc!r}"})
            return
        finally:
            for fd in fds:
                os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.selector.register(pidfd, selectors.EVENT_READ, pid)
        self.children[pid], self.pids[job] = (job, pidfd, request, slot), pid
        self.send({"job": job, "pid": pid, "slot": slot})

    def kill(self, job: str) -> None:
        pid = self.pids.get(job)
        if pid is None:
            for queued in [q for q in self.queue if q[0]["start"] == job]:  # not started: drop it
                self.queue.remove(queued)
                for fd in queued[1]:
                    os.close(fd)
                self.send({"job": job, "error": "killed before it started"})
            return  # or already reaped: its status is on its way
        # pid 1 of its namespace: the kernel ends every other process in it. At level "none" its
        # process group too, and the slot's cgroup, which holds this job's processes only: the pid
        # is ours until we reap it, and the slot is not given to another job before that.
        os.kill(pid, signal.SIGKILL)
        _, _, request, slot = self.children[pid]
        if request["level"] == "none":
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        group = self.setup["cgroups"].get(slot)
        if group:
            group.kill_all()

    def reap(self) -> None:
        """Collect the exit status of jails that ended. We are also the child subreaper: orphans
        (at level "none") end up here and must not stay zombies."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.children:
                job, pidfd, request, slot = self.children.pop(pid)
                del self.pids[job]
                self.selector.unregister(pidfd)
                os.close(pidfd)
                group = self.setup["cgroups"].get(slot)
                leftover = bool(group and group.procs())
                if leftover and not group.kill_all():
                    raise RuntimeError(f"slot {slot}: processes survive SIGKILL: {group.procs()}")
                oom = bool(group and group.new_oom_kills())
                self.send({"job": job, "status": status, "leftover": leftover, "oom": oom})
                self.free_slots.append(slot)
        self.dispatch()

    def spec(self, request: dict, slot: int) -> dict:
        setup = self.setup
        memory = int(request["memory_mb"]) << 20
        level = request["level"]
        spec = {
            "level": level, "root": setup["root"], "own_pid_ns": setup["own_pid_ns"], "parent_pidfd": self.pidfd,
            "net_ns": setup["net_ns"].get(slot, -1), "root_ns": setup["root_ns"],
            "uid": setup["uid_base"] + slot, "timeout_s": float(request["timeout_s"]),
            "cgroup_procs": setup["cgroups"][slot].procs_files if slot in setup["cgroups"] and level != "none" else [],
            "workdir_bytes": setup["workdir_mb"] << 20, "copy_from": request.get("copy_from"),
            "address_space_bytes": memory + (512 << 20), "file_size_bytes": setup["workdir_mb"] << 20,
            "open_files": 64, "processes": setup["processes"],
            "landlock_abi": setup["landlock_abi"], "seccomp_program": setup["seccomp_program"],
            "env": dict(setup["env"]), "host_workdir": request.get("host_workdir"),
        }
        if level == "none":
            spec["env"]["HOME"] = spec["host_workdir"]
        return spec


def _target(kind: str):
    """What the sealed jail does with its job: grade in-process, or become the program."""
    if kind == "harness":
        return lambda request, spec: harness.main(request, spec["landlock_abi"])
    if kind == "exec":
        def run(request: dict, spec: dict) -> None:
            for fd in (jail.RESULT_FD, jail.CHECK_FD):
                os.close(fd)
            os.execvpe(request["argv"][0], request["argv"], spec["env"])
        return run
    raise OSError(f"unknown job kind {kind!r}")


def start(setup: dict) -> tuple[int, socket.socket]:
    """Fork the zygote (call before reading any job); returns its pid and the server's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server_pid = os.getpid()
    pid = os.fork()
    if pid:
        theirs.close()
        return pid, ours
    try:
        ours.close()
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server_pid:  # the server died before the line above
            os._exit(1)
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)  # the server's reply pipe stays the server's
        os.close(null)
        # Everything alive now is shared with every jail: keep the collector off it, so that a jail's
        # first collection does not write to (and copy) every page of the image.
        gc.freeze()
        Zygote(theirs, setup).serve()
    finally:
        os._exit(0)
