"""One isolated run: a single process, the jail, forked from the zygote (zygote.py).

    zygote ─fork─► jail (pid 1 of a fresh pid namespace; fresh mount/ipc/uts/cgroup namespaces;
                         the slot's own empty network namespace; later a user namespace owning nothing)
                     runs the harness in-process, or execs a program

The zygote is the jail's parent and collects its exit status; the server enforces the wall clock
through it (SIGKILL of pid 1 ends every process of the namespace). The jail sees a read-only root
(read-only all the way down) holding only /usr, the interpreter's prefix, four device files, its own
/proc and a size-capped tmpfs at /work (also /tmp); the read-only part is built once by the server
(`build_root`), each jail takes a private copy of it. The job itself comes last, from REQUEST_FD,
once the jail is sealed.
It runs as an unprivileged per-slot uid (when the server is root) inside a user namespace that owns
nothing, with no capabilities, rlimits, no_new_privs, Landlock and seccomp. When pid 1 dies the
kernel kills the whole namespace, so no process outlives the run."""

import fcntl
import json
import math
import os
import resource
import select
import shutil
import signal

from sandbox import linux

LEVELS = ("full", "namespaces", "none")  # strongest first
# The jail's file descriptors. REQUEST_FD holds its job (the program, or the solution and the test
# inputs); CHECK_FD an assert-format grading's test code, read only by the checker process.
RESULT_FD, STATUS_FD, REQUEST_FD, CHECK_FD, PARENT_PIDFD, NET_NS_FD, ROOT_NS_FD = 3, 4, 5, 6, 7, 8, 9
STREAMS = ("stdin", "stdout", "stderr", "result", "status", "request", "check")
DEVICES = ("null", "zero", "random", "urandom")
MAX_SLOTS = 256  # runs at once per server; each server takes a block of MAX_SLOTS uids
MAX_TIMEOUT_S, MAX_MEMORY_MB = 24 * 3600.0, 1 << 20


def check_limits(timeout_s, memory_mb) -> tuple[float, int]:
    """A run's time and memory limits, or ValueError naming the bad one."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) \
            or not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s={timeout_s!r}: must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or not 16 <= memory_mb <= MAX_MEMORY_MB:
        raise ValueError(f"memory_mb={memory_mb!r}: must be an integer number of MiB in [16, {MAX_MEMORY_MB}]")
    return float(timeout_s), int(memory_mb)


def spawn(spec: dict, fds: dict[str, int], target) -> int:
    """Fork the jail from the zygote; returns its pid. `fds` holds the job's descriptors by name
    (STREAMS). `target(request, spec)` runs in the jail once it is sealed, with the job read from its
    request descriptor.

    Unless the level is "none", the zygote's children go into a fresh pid namespace for this one
    fork, so that the jail is its pid 1, and the zygote goes back to its own (`spec["own_pid_ns"]`)
    right after. (A monitor process between the two, as earlier versions had, doubled the cost of a
    run: a second fork of the image, and its page faults.)"""
    isolated = spec["level"] != "none"
    if isolated:
        linux.unshare(linux.CLONE_NEWPID)
    pid = -1
    try:
        pid = os.fork()
    finally:
        if isolated and pid:  # in the server (the jail sees 0)
            linux.setns(spec["own_pid_ns"], linux.CLONE_NEWPID)
    if pid:
        return pid
    try:
        # Lift the job's pipes above the low numbers first, then put them in place.
        keep = [fds[name] for name in STREAMS] + [spec["parent_pidfd"]]
        keep += [spec["net_ns"], spec["root_ns"]] if isolated else []
        lifted = [fcntl.fcntl(fd, fcntl.F_DUPFD, 16) for fd in keep]
        for i, fd in enumerate(lifted):
            os.dup2(fd, i)
        os.closerange(len(lifted), 2 ** 16)
        _jail(spec, target)
    except BaseException as exc:  # the jail must never return into the server's loop
        _report({"setup_error": f"jail: {exc!r}"})
        os._exit(125)
    os._exit(0)


def _report(status: dict) -> None:
    try:
        os.write(STATUS_FD, (json.dumps(status) + "\n").encode())
    except OSError:
        pass


def _jail(spec: dict, target) -> None:
    os.setsid()
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([PARENT_PIDFD], [], [], 0)[0]:  # the zygote died before the line above
        os._exit(125)
    os.close(PARENT_PIDFD)
    for path in spec["cgroup_procs"]:
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, b"0")
        os.close(fd)
    uid, gid = (spec["uid"], spec["uid"]) if spec["root"] else (os.geteuid(), os.getegid())
    if spec["level"] == "none":
        workdir = spec["host_workdir"]
        os.chown(workdir, uid, gid)
        _copy_in(spec.get("copy_from"), workdir, uid, gid)
    else:
        workdir = "/work"
        source = os.open(spec["copy_from"], os.O_RDONLY | os.O_DIRECTORY) if spec.get("copy_from") else None
        # The slot's empty network namespace and the prepared root (Server.prepare_root); joined the
        # slot's cgroup first, so that it is the root of the new cgroup namespace.
        linux.setns(NET_NS_FD, linux.CLONE_NEWNET)
        linux.setns(ROOT_NS_FD, linux.CLONE_NEWNS)  # also moves our root to the prepared one
        os.close(NET_NS_FD)
        os.close(ROOT_NS_FD)
        linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS | linux.CLONE_NEWCGROUP)
        _finish_root(spec, uid, gid, source)
    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
    os.write(fd, b"1000")  # under memory pressure the sandbox dies first, never the trainer
    os.close(fd)
    os.chdir(workdir)
    if spec["root"]:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if spec["level"] != "none":
        linux.unshare(linux.CLONE_NEWUSER)  # a namespace that owns nothing: its capabilities are void
        linux.drop_capabilities()
    _set_rlimits(spec)
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    if spec["landlock_abi"]:
        read_only = ["/"]
        devices = [f"/dev/{d}" for d in DEVICES] if spec["level"] != "none" else []
        linux.landlock_restrict(read_only, [workdir], devices, spec["landlock_abi"])
    if spec["seccomp_program"]:
        linux.install_seccomp(spec["seccomp_program"])
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # cleared by the uid change above; set again
    os.close(STATUS_FD)
    request = _read_request()
    target(request, spec)
    os._exit(0)


def _read_request() -> dict:
    chunks = []
    while chunk := os.read(REQUEST_FD, 1 << 20):
        chunks.append(chunk)
    os.close(REQUEST_FD)
    return json.loads(b"".join(chunks))


def build_root(new: str, prefixes: list[str], hide: list[str], host_proc: bool) -> None:
    """The read-only part of every jail's root, built once by the server in a mount namespace of its
    own, then pivoted into: /usr, the interpreter's prefixes (site-packages hidden), the /bin, /lib...
    links, four device files and empty mount points. `host_proc` keeps a proc mount at /proc, which
    an unprivileged server needs so that its jails may mount their own over it."""
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount("tmpfs", new, "tmpfs", linux.MS_NOSUID, "size=1m,mode=755")
    for d in ("usr", "proc", "dev", "work", "tmp", ".old"):
        os.mkdir(f"{new}/{d}")
    for name in ("bin", "lib", "lib64", "lib32", "sbin"):
        if os.path.islink(f"/{name}"):
            os.symlink(os.readlink(f"/{name}"), f"{new}/{name}")
        elif os.path.isdir(f"/{name}"):
            os.mkdir(f"{new}/{name}")
            linux.bind_readonly(f"/{name}", f"{new}/{name}")
    linux.bind_readonly("/usr", f"{new}/usr")
    for prefix in prefixes:
        os.makedirs(new + prefix, exist_ok=True)
        linux.bind_readonly(prefix, new + prefix)
    for hidden in hide:  # site-packages: the jail gets the standard library only
        linux.mount("tmpfs", new + hidden, "tmpfs", linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV, "size=4k")
    for dev in DEVICES:
        open(f"{new}/dev/{dev}", "w").close()
        linux.mount(f"/dev/{dev}", f"{new}/dev/{dev}", None, linux.MS_BIND)
        # Still readable and writable as devices, but the host's inodes cannot be touched (utimes...).
        linux.mount("none", f"{new}/dev/{dev}", None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY
                    | linux.MS_NOSUID | linux.MS_NOEXEC)
    os.symlink("/proc/self/fd", f"{new}/dev/fd")
    if host_proc:
        linux.mount("proc", f"{new}/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    linux.pivot_root(new, f"{new}/.old")
    os.chdir("/")
    linux.umount("/.old")
    os.rmdir("/.old")
    linux.mount("none", "/", None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID)


def _finish_root(spec: dict, uid: int, gid: int, source: int | None) -> None:
    """Per run, in a copy of the prepared root: this run's /proc, and a fresh size-capped /work
    (also /tmp)."""
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    linux.mount("tmpfs", "/work", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                f"size={spec['workdir_bytes']},mode=700,uid={uid},gid={gid}")
    if source is not None:  # opened on the host's side; reached here through our own /proc
        _copy_in(f"/proc/self/fd/{source}", "/work", uid, gid)
        os.close(source)
    linux.mount("/work", "/tmp", None, linux.MS_BIND)
    linux.sethostname("sandbox")


def _copy_in(source: str | None, workdir: str, uid: int, gid: int) -> None:
    """`sandbox run --workdir DIR`: the program works on a private copy; nothing is written back."""
    if not source:
        return
    shutil.copytree(source, workdir, dirs_exist_ok=True, symlinks=True)
    for base, dirs, files in os.walk(workdir):
        for name in dirs + files:
            os.lchown(os.path.join(base, name), uid, gid)


def _set_rlimits(spec: dict) -> None:
    cpu = int(spec["timeout_s"]) + 1
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),          # SIGXCPU, then SIGKILL
        resource.RLIMIT_AS: (spec["address_space_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (spec["file_size_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (spec["open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    if spec["root"] or spec["level"] != "none":
        # Counted per user namespace and uid (kernel >= 5.14), and the jail has just made its own
        # user namespace: the count is this run's own, also for a server that is not root (whose
        # jails run as the caller's uid). At level "none" without root it would count every process
        # of the caller's uid; no process limit holds there (the level says so).
        limits[resource.RLIMIT_NPROC] = (spec["processes"],) * 2
    for which, value in limits.items():
        resource.setrlimit(which, value)
