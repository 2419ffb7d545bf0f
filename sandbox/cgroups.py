"""Per-slot control groups: a memory limit and a process limit that hold for root (RLIMIT_NPROC does
not), a CPU limit where the cpu controller is there, the OOM-kill count, and a way to kill
everything left in a slot.

cgroup v1 needs the `memory` and `pids` hierarchies; cgroup v2 needs both controllers available at
the unified root (a v2 mount that only offers `hugetlb`, as on the Debian CI machines, does not count)."""

import os
import signal
import time

V1_ROOT = "/sys/fs/cgroup"
V2_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
GROUP = "r1sandbox"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def detect() -> tuple[str | None, str]:
    """("v1" | "v2" | None, why). Probes by creating and removing a group."""
    reasons = []
    v1 = [f"{V1_ROOT}/memory", f"{V1_ROOT}/pids"]
    if all(os.path.isfile(f"{d}/cgroup.procs") and not os.path.isfile(f"{d}/cgroup.controllers") for d in v1):
        try:
            for d in v1:
                os.makedirs(f"{d}/{GROUP}", exist_ok=True)
            return "v1", "memory and pids hierarchies writable"
        except OSError as exc:
            reasons.append(f"v1: {exc}")
    for root in V2_ROOTS:
        controllers = f"{root}/cgroup.controllers"
        if not os.path.isfile(controllers):
            continue
        have = _read(controllers).split()
        if not {"memory", "pids"} <= set(have):
            reasons.append(f"v2 at {root}: controllers {have} lack memory/pids")
            continue
        try:
            _write(f"{root}/cgroup.subtree_control", "+memory +pids")
            os.makedirs(f"{root}/{GROUP}", exist_ok=True)
            _write(f"{root}/{GROUP}/cgroup.subtree_control", "+memory +pids")
            return "v2", f"memory and pids delegated at {root}"
        except OSError as exc:
            reasons.append(f"v2 at {root}: {exc}")
    return None, "; ".join(reasons) or "no cgroup hierarchy with memory and pids"


def remove_stale() -> None:
    """Slot groups of servers that have exited (`<server pid>-<slot>`): a SIGKILLed server cannot
    remove its own."""
    v1 = [f"{V1_ROOT}/{h}/{GROUP}" for h in ("memory", "pids", "cpu")]
    for parent in [*v1, *(f"{r}/{GROUP}" for r in V2_ROOTS)]:
        if not os.path.isdir(parent) or os.path.islink(parent):
            continue
        for name in os.listdir(parent):
            pid = name.split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}") and os.path.isdir(f"{parent}/{name}"):
                try:
                    os.rmdir(f"{parent}/{name}")
                except OSError:  # still has processes: leave it
                    pass


def _v2_root() -> str:
    return next(r for r in V2_ROOTS if os.path.isdir(f"{r}/{GROUP}") and os.path.isfile(f"{r}/cgroup.controllers"))


class SlotCgroup:
    """One group per pool slot, reused by the slot's consecutive runs."""

    def __init__(self, version: str, name: str, pids_max: int, cpus: float):
        self.version = version
        if version == "v1":
            self.memory, self.pids = f"{V1_ROOT}/memory/{GROUP}/{name}", f"{V1_ROOT}/pids/{GROUP}/{name}"
            dirs = [self.memory, self.pids]
        else:
            self.memory = self.pids = f"{_v2_root()}/{GROUP}/{name}"
            dirs = [self.memory]
        for d in dirs:
            os.makedirs(d, exist_ok=True)
        self.dirs = dirs
        self.memory_bytes = 1 << 62  # a new group starts unlimited
        self.oom_kills_seen = self.oom_kills()
        _write(f"{self.pids}/pids.max", pids_max)
        self.cpu_limited = self._limit_cpu(name, cpus)

    def _limit_cpu(self, name: str, cpus: float) -> bool:
        """At most `cpus` cores for a run (threads and children together), where the cpu controller
        is there: a thread bomb then cannot starve the trainer. False when it is not."""
        period = 100_000
        try:
            if self.version == "v1":
                if not os.path.isfile(f"{V1_ROOT}/cpu/cpu.cfs_quota_us"):
                    return False
                group = f"{V1_ROOT}/cpu/{GROUP}/{name}"
                os.makedirs(group, exist_ok=True)
                self.dirs.append(group)
                _write(f"{group}/cpu.cfs_period_us", period)
                _write(f"{group}/cpu.cfs_quota_us", int(cpus * period))
            else:
                parent = os.path.dirname(self.memory)
                if "cpu" not in _read(f"{parent}/cgroup.controllers").split():
                    return False
                _write(f"{parent}/cgroup.subtree_control", "+cpu")
                _write(f"{self.memory}/cpu.max", f"{int(cpus * period)} {period}")
        except OSError:
            return False
        return True

    @property
    def procs_files(self) -> list[str]:
        """What a process joining this group writes "0" into."""
        return [f"{d}/cgroup.procs" for d in self.dirs]

    def set_memory(self, limit: int) -> None:
        if limit == self.memory_bytes:
            return
        if self.version == "v2":
            _write(f"{self.memory}/memory.max", limit)
            if os.path.exists(f"{self.memory}/memory.swap.max"):
                _write(f"{self.memory}/memory.swap.max", 0)
        else:
            # memsw (memory + swap) must never be below the memory limit, so the order matters.
            files = ["memory.limit_in_bytes"]
            if os.path.exists(f"{self.memory}/memory.memsw.limit_in_bytes"):
                files.append("memory.memsw.limit_in_bytes")
            for f in (files if limit < self.memory_bytes else reversed(files)):
                _write(f"{self.memory}/{f}", limit)
        self.memory_bytes = limit

    def oom_kills(self) -> int:
        text = _read(f"{self.memory}/memory.events" if self.version == "v2" else f"{self.memory}/memory.oom_control")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def new_oom_kills(self) -> int:
        """OOM kills since the last call (the slot's runs are sequential, so: during the last run)."""
        count = self.oom_kills()
        new, self.oom_kills_seen = count - self.oom_kills_seen, count
        return new

    def procs(self) -> list[int]:
        return sorted({int(p) for d in self.dirs for p in _read(f"{d}/cgroup.procs").split()})

    def kill_all(self, wait_s: float = 2.0) -> bool:
        """SIGKILL every process in the group; True once it is empty."""
        deadline = time.monotonic() + wait_s
        while True:
            procs = self.procs()
            if not procs:
                return True
            if time.monotonic() > deadline:
                return False
            if self.version == "v2" and os.path.exists(f"{self.memory}/cgroup.kill"):
                _write(f"{self.memory}/cgroup.kill", 1)
            else:
                for pid in procs:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.001)

    def remove(self) -> None:
        self.kill_all()
        for d in self.dirs:
            try:
                os.rmdir(d)
            except OSError:
                pass
