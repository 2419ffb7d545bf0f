"""One isolated run, as two processes forked from the fork server.

    server ─fork─► monitor (host pid namespace; enforces the wall clock, reports the exit status)
                     └─fork─► jail (pid 1 of fresh user/pid/net/mount/ipc/uts/cgroup namespaces)
                                 runs the harness in-process, or execs a program

The jail sees a read-only root holding only /usr, the interpreter's prefix, four device files, its
own /proc and a size-capped tmpfs at /work (also /tmp). It runs as an unprivileged per-slot uid
(when the server is root) inside a user namespace that owns nothing, with no capabilities, rlimits,
no_new_privs, Landlock and seccomp. When pid 1 dies the kernel kills the whole namespace, so no
process outlives the run."""

import fcntl
import json
import os
import resource
import select
import shutil
import signal

from sandbox import linux

LEVELS = ("full", "namespaces", "none")  # strongest first
STATUS_FD, RESULT_FD = 4, 3
DEVICES = ("null", "zero", "random", "urandom")


def spawn(spec: dict, stdin_fd: int, out_fd: int, err_fd: int, result_fd: int, status_fd: int, target) -> int:
    """Fork the monitor; returns its pid. `target()` runs in the jail once it is sealed."""
    pid = os.fork()
    if pid:
        return pid
    try:
        # Lift the job's pipes above the low numbers first, then put them in place.
        fds = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (stdin_fd, out_fd, err_fd, result_fd, status_fd)]
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        os.closerange(5, 2 ** 16)
        _monitor(spec, target)
    except BaseException as exc:  # the monitor must never return into the server's loop
        _report({"setup_error": f"monitor: {exc!r}"})
    os._exit(0)


def _report(status: dict) -> None:
    try:
        os.write(STATUS_FD, (json.dumps(status) + "\n").encode())
    except OSError:
        pass


def _monitor(spec: dict, target) -> None:
    os.setsid()
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != spec["server_pid"]:
        return
    if spec["level"] != "none":
        flags = linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWNET | linux.CLONE_NEWIPC | \
            linux.CLONE_NEWUTS | linux.CLONE_NEWCGROUP
        if os.geteuid() != 0:  # unprivileged: a user namespace first, where we are root
            uid, gid = os.geteuid(), os.getegid()
            linux.unshare(linux.CLONE_NEWUSER | flags)
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        else:
            linux.unshare(flags)
    child = os.fork()
    if child == 0:
        try:
            _jail(spec, target)
        except BaseException as exc:
            _report({"setup_error": f"jail: {exc!r}"})
            os._exit(125)
    for fd in (0, 1, 2, 3):
        os.close(fd)
    pidfd = os.pidfd_open(child)
    ready, _, _ = select.select([pidfd], [], [], spec["timeout_s"])
    timed_out = not ready
    if timed_out:  # pid 1 dies, and with it every process of its namespace
        os.kill(child, signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        _report({"signal": os.WTERMSIG(status), "timeout": timed_out})
    else:
        _report({"exit": os.WEXITSTATUS(status), "timeout": timed_out})


def _jail(spec: dict, target) -> None:
    for path in spec["cgroup_procs"]:
        with open(path, "w") as f:
            f.write("0")
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # under memory pressure the sandbox dies first, never the trainer
    uid, gid = (spec["uid"], spec["uid"]) if spec["root"] else (os.geteuid(), os.getegid())
    if spec["level"] == "none":
        workdir = spec["host_workdir"]
        os.chown(workdir, uid, gid)
        _copy_in(spec.get("copy_from"), workdir, uid, gid)
    else:
        workdir = "/work"
        _build_root(spec, uid, gid)
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
    if spec["seccomp"]:
        linux.install_seccomp(linux.seccomp_program())
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # cleared by the uid change above; set again
    os.close(STATUS_FD)
    target()
    os._exit(0)


def _build_root(spec: dict, uid: int, gid: int) -> None:
    new = spec["mountpoint"]
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
    for prefix in spec["prefixes"]:
        os.makedirs(new + prefix, exist_ok=True)
        linux.bind_readonly(prefix, new + prefix)
    for hidden in spec["hide"]:  # site-packages: the jail gets the standard library only
        linux.mount("tmpfs", new + hidden, "tmpfs", linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV, "size=4k")
    for dev in DEVICES:
        open(f"{new}/dev/{dev}", "w").close()
        linux.mount(f"/dev/{dev}", f"{new}/dev/{dev}", None, linux.MS_BIND)
    os.symlink("/proc/self/fd", f"{new}/dev/fd")
    linux.mount("tmpfs", f"{new}/work", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                f"size={spec['workdir_bytes']},mode=700,uid={uid},gid={gid}")
    _copy_in(spec.get("copy_from"), f"{new}/work", uid, gid)
    linux.mount(f"{new}/work", f"{new}/tmp", None, linux.MS_BIND)
    linux.mount("proc", f"{new}/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    linux.pivot_root(new, f"{new}/.old")
    os.chdir("/")
    linux.umount("/.old")
    os.rmdir("/.old")
    linux.mount("none", "/", None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID)
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
    if spec["root"]:
        # Per-slot uid: the count is this run's own. (Under the caller's uid it would count the
        # caller's processes too; the pids cgroup is the limit that holds there.)
        limits[resource.RLIMIT_NPROC] = (spec["processes"],) * 2
    for which, value in limits.items():
        resource.setrlimit(which, value)
