"""The Linux primitives the jail is built from, through ctypes (Python 3.11 has no os.unshare):
namespaces, mounts, pivot_root, capabilities, seccomp-bpf and Landlock.

Only the standard library: this module is imported by the fork server, which runs the base
interpreter with `-I -S`."""

import ctypes
import errno
import os
import platform
import struct

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # same on every arch (a syscall added after the numbering was unified)

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER = 1, 4, 38, 22, 36

# Syscall numbers; seccomp's deny list is only written for x86_64 (the machines this is tested on).
X86_64 = {
    "socket": 41, "clone": 56, "ptrace": 101, "syslog": 103, "uselib": 134, "ustat": 136, "sysfs": 139,
    "vhangup": 153, "pivot_root": 155, "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
    "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
    "quotactl": 179, "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "migrate_pages": 256, "unshare": 272, "move_pages": 279,
    "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "clone3": 435, "pidfd_getfd": 438, "mount_setattr": 442,
}
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 444, 445, 446  # same on every arch


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _check(libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    _check(libc.setns(fd, nstype), f"setns({nstype:#x})")


def enter_user_namespace() -> None:
    """Become root of a new user namespace (mapped to our own uid), for a server that is not root:
    it then may create the other namespaces of its jails."""
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} on {target}")


def bind_readonly(source: str, target: str) -> None:
    """A recursive bind of `source` at `target`, read-only all the way down: the mounts below
    `source` (a separate /usr/local, a venv's prefix on another filesystem...) included."""
    mount(source, target, None, MS_BIND | MS_REC)
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, target.encode(), AT_RECURSIVE, ctypes.c_char_p(attr), len(attr)) == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        _check(-1, f"mount_setattr {target}")
    # Kernels before 5.12: remount each mount at or below the target, deepest last.
    below = [target]
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(target.rstrip("/") + "/"):
                below.append(point)
    for point in below:
        mount("none", point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def umount(target: str) -> None:
    _check(libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    if SYS_PIVOT_ROOT is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall number on {platform.machine()}")
    _check(libc.syscall(SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")


def sethostname(name: str) -> None:
    _check(libc.sethostname(name.encode(), len(name)), "sethostname")


def prctl(option: int, arg: int = 0) -> None:
    _check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def drop_capabilities() -> None:
    """Empty effective, permitted and inheritable sets (capset, version 3)."""
    header = struct.pack("II", 0x20080522, 0)
    data = bytes(24)
    _check(libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(data)), "capset")


# --- seccomp -------------------------------------------------------------------------------------

_BPF_LD_W_ABS, _BPF_JEQ, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x45, 0x06
_RET_ALLOW, _RET_KILL, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_AUDIT_ARCH_X86_64 = 0xC000003E
_AF_UNIX = 1


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp_program() -> bytes:
    """Deny what a grading run never needs: other sockets than AF_UNIX, new namespaces, mounts,
    ptrace and cross-process memory access, kernel keyrings, bpf, io_uring, modules, clock and reboot.
    clone3 gets ENOSYS so that libc falls back to clone, whose flags we can inspect."""
    deny = sorted(nr for name, nr in X86_64.items() if name not in ("socket", "clone", "clone3"))
    prog = [
        _ins(_BPF_LD_W_ABS, 4),                                   # seccomp_data.arch
        _ins(_BPF_JEQ, _AUDIT_ARCH_X86_64, 1, 0),
        _ins(_BPF_RET, _RET_KILL),
        _ins(_BPF_LD_W_ABS, 0),                                   # seccomp_data.nr
        _ins(0x35, 0x40000000, 0, 1),                             # JGE: x32 ABI numbers
        _ins(_BPF_RET, _RET_ERRNO | errno.EPERM),
    ]
    for nr in deny:
        prog += [_ins(_BPF_JEQ, nr, 0, 1), _ins(_BPF_RET, _RET_ERRNO | errno.EPERM)]
    prog += [
        _ins(_BPF_JEQ, X86_64["clone3"], 0, 1), _ins(_BPF_RET, _RET_ERRNO | errno.ENOSYS),
        _ins(_BPF_JEQ, X86_64["socket"], 0, 3),
        _ins(_BPF_LD_W_ABS, 16),                                  # args[0] (low word): the family
        _ins(_BPF_JEQ, _AF_UNIX, 5, 0),
        _ins(_BPF_RET, _RET_ERRNO | errno.EACCES),
        _ins(_BPF_JEQ, X86_64["clone"], 0, 3),
        _ins(_BPF_LD_W_ABS, 16),                                  # clone flags
        _ins(_BPF_JSET, NAMESPACE_FLAGS, 0, 1),
        _ins(_BPF_RET, _RET_ERRNO | errno.EPERM),
        _ins(_BPF_RET, _RET_ALLOW),
    ]
    return b"".join(prog)


def seccomp_supported() -> bool:
    return platform.machine() == "x86_64" and os.path.exists("/proc/self/status") and \
        "Seccomp:" in open("/proc/self/status").read()


def install_seccomp(program: bytes) -> None:
    """Needs PR_SET_NO_NEW_PRIVS first."""
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(buf))
    _check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.c_char_p(fprog), 0, 0), "seccomp")


# --- Landlock ------------------------------------------------------------------------------------

_FS_READ = 1 | 4 | 8                       # execute, read file, read dir
_FS_DEVICE = 2 | 4                         # write file, read file
_FS_ALL_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}


def landlock_abi() -> int:
    """0 when the kernel has no Landlock (or it is disabled)."""
    result = libc.syscall(SYS_LANDLOCK_CREATE, None, 0, 1)   # LANDLOCK_CREATE_RULESET_VERSION
    return max(int(result), 0)


def landlock_restrict(read_only: list[str], writable: list[str], devices: list[str], abi: int) -> None:
    """Read-only below `read_only`, full access below `writable`, read/write of the `devices` files,
    nothing else; with ABI >= 4 no TCP bind/connect, with ABI >= 6 no signals or abstract sockets
    outside the domain."""
    handled_fs = _FS_ALL_BY_ABI[min(abi, 5)]
    attr = struct.pack("QQQ", handled_fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    fd = _check(libc.syscall(SYS_LANDLOCK_CREATE, ctypes.c_char_p(attr[:size]), size, 0), "landlock ruleset")
    try:
        for paths, access in ((read_only, _FS_READ), (writable, handled_fs), (devices, _FS_DEVICE)):
            for path in paths:
                parent = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    rule = struct.pack("=Qi", access, parent)
                    _check(libc.syscall(SYS_LANDLOCK_ADD_RULE, fd, 1, ctypes.c_char_p(rule), 0), f"landlock {path}")
                finally:
                    os.close(parent)
        _check(libc.syscall(SYS_LANDLOCK_RESTRICT, fd, 0), "landlock restrict")
    finally:
        os.close(fd)
