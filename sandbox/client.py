"""The supervisor side: start the fork server, check its isolation level against what the caller
accepts, send it jobs and hand back results. Safe to use from a multi-threaded trainer: the only
fork happens in the server, a fresh single-threaded process.

Nothing here can hang or take the caller down with the server: requests go out on a writer thread
(no lock is held across a pipe write), replies come in on a reader thread, every wait has a
deadline, a server that dies fails its pending futures and is started again on the next job, and the
server's parent-death signal follows the writer thread, which lives as long as the Sandbox (not the
thread that happened to call first)."""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import sysconfig
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.jail import LEVELS, MAX_SLOTS, check_limits

ROOT = Path(__file__).resolve().parent.parent
ISOLATION_ENV = "R1_SANDBOX_ISOLATION"  # the weakest level a user accepts: full | namespaces | none
START_TIMEOUT_S = 120.0   # the server's start-up and probe
REPLY_MARGIN_S = 10.0     # beyond a job's own time limit, before its answer counts as lost


class SandboxUnavailable(RuntimeError):
    """The host cannot isolate untrusted code at the level the caller requires, or the server died."""


@dataclass
class RunResult:
    status: str                  # exited | timeout | memory | output_limit | signaled | sandbox_error | shutdown
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    wall_s: float
    level: str
    result: str = ""             # the harness's result lines (gradings only)
    leftover_processes: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "exited" and self.exit_code == 0

    @classmethod
    def failed(cls, error: str, level: str = "") -> "RunResult":
        return cls("sandbox_error", None, None, "", "", 0.0, level, error=error)


@dataclass
class Limits:
    """Per-run limits; `slots` runs at once. Two per CPU core by default (at most 64): part of each
    run's time is spent waiting (pipes, process exit and namespace teardown), not on the CPU. Memory
    is bounded by slots x the per-run memory limit."""
    slots: int = field(default_factory=lambda: min(64, 2 * (os.cpu_count() or 1)))
    workdir_mb: int = 64
    processes: int = 64
    output_cap: int = 1 << 20
    result_cap: int = 4 << 20
    cpus: float = 1.0    # cores one run may use at once (cgroup cpu controller, where there is one)

    def __post_init__(self):
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, (int, float)) or not 0.01 <= self.cpus <= 1024:
            raise ValueError(f"Limits.cpus={self.cpus!r}: must be a number of cores in [0.01, 1024]")
        for name, low, high in (("slots", 1, MAX_SLOTS), ("workdir_mb", 1, 1 << 16), ("processes", 1, 1 << 16),
                                ("output_cap", 1 << 10, 1 << 30), ("result_cap", 1 << 10, 1 << 30)):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"Limits.{name}={value!r}: must be an integer in [{low}, {high}]")


def _interpreter() -> tuple[str, list[str], list[str]]:
    """The base interpreter (not a venv's), the prefixes the jail must see, and site-packages to hide."""
    executable = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefixes = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)})
    prefixes = [p for p in prefixes if not p.startswith("/usr/") and p != "/usr"]
    base_vars = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    sites = {os.path.realpath(sysconfig.get_path(k, vars=base_vars)) for k in ("purelib", "platlib")}
    return executable, prefixes, sorted(s for s in sites if os.path.isdir(s))


class _Connection:
    """One server process, the thread that writes to it (and started it) and the one that reads."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.futures: dict[str, Future] = {}
        self.lock = threading.Lock()
        self.outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self.dead: str | None = None
        self.process: subprocess.Popen | None = None
        self.hello, self.start_error = None, None
        started = threading.Event()
        self.writer = threading.Thread(target=self._write, args=(started,), daemon=True, name="sandbox-requests")
        self.writer.start()
        if not started.wait(START_TIMEOUT_S) or self.hello is None:
            self.close()
            raise SandboxUnavailable(f"the sandbox server did not start: {self.start_error or 'no answer'}")

    def _write(self, started: threading.Event) -> None:
        try:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={},
                                            cwd="/", start_new_session=True)
            line = self.process.stdout.readline()
            if line:
                self.hello = json.loads(line)
            else:
                self.start_error = f"exit status {self.process.wait()}"
        except (OSError, ValueError) as exc:
            self.start_error = repr(exc)
        started.set()
        if self.hello is not None:
            threading.Thread(target=self._read, daemon=True, name="sandbox-replies").start()
            while (data := self.outgoing.get()) is not None:
                try:
                    self.process.stdin.write(data)
                    self.process.stdin.flush()
                except (OSError, ValueError):
                    self._fail("the sandbox server exited")
                    break
        if self.process is not None:  # this thread stays until the server is gone (its parent-death signal)
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _read(self) -> None:
        reason = "the sandbox server exited"
        try:
            for line in self.process.stdout:
                reply = json.loads(line)
                with self.lock:
                    future = self.futures.pop(reply.pop("id"), None)
                if future is not None:
                    future.set_result(RunResult(**reply))
        except Exception as exc:  # a truncated or malformed reply: nothing after it can be trusted
            reason = f"unreadable reply from the sandbox server: {exc!r}"
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        with self.lock:
            self.dead = self.dead or reason
            futures, self.futures = list(self.futures.values()), {}
        for future in futures:
            future.set_exception(SandboxUnavailable(reason))
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def submit(self, job_id: str, data: bytes) -> Future:
        future = Future()
        with self.lock:
            if self.dead:
                raise SandboxUnavailable(self.dead)
            self.futures[job_id] = future
        self.outgoing.put(data)
        return future

    def close(self) -> None:
        self.outgoing.put(None)
        self.writer.join(timeout=30)
        self._fail("the sandbox was closed")
        if self.process is not None:
            self.process.stdout.close()


class Sandbox:
    def __init__(self, accept: str | None = None, limits: Limits | None = None, disable: tuple[str, ...] = ()):
        """`accept`: the weakest isolation level to run at (default: full, or $R1_SANDBOX_ISOLATION).
        `disable`: mechanisms to leave off ("landlock", "seccomp", "cgroup"), as on a host that lacks
        them; the level drops accordingly (for tests of what such a host gets)."""
        if not set(disable) <= {"landlock", "seccomp", "cgroup"}:
            raise ValueError(f"disable={disable!r}: only 'landlock', 'seccomp' and 'cgroup' can be left off")
        self.accept = accept or os.environ.get(ISOLATION_ENV, "full")
        if self.accept not in LEVELS:
            raise ValueError(f"accept={self.accept!r}: must be one of {LEVELS} (strongest first)")
        self.limits = limits or Limits()
        executable, prefixes, hide = _interpreter()
        config = {"slots": self.limits.slots, "workdir_mb": self.limits.workdir_mb,
                  "processes": self.limits.processes, "output_cap": self.limits.output_cap,
                  "result_cap": self.limits.result_cap, "cpus": self.limits.cpus, "prefixes": prefixes, "hide": hide,
                  "disable": list(disable)}
        # The server loads the package's modules without its __init__ (which imports this module and,
        # through it, threading, subprocess and concurrent.futures): every module whose at-fork hooks
        # run in each jail costs page faults there.
        boot = (f"import sys, types; package = types.ModuleType('sandbox'); "
                f"package.__path__ = [{str(ROOT / 'sandbox')!r}]; sys.modules['sandbox'] = package; "
                "from sandbox.server import main; main()")
        self._argv = [executable, "-I", "-S", "-B", "-c", boot, json.dumps(config)]
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.restarts = 0
        self._connection = self._connect()

    def _connect(self) -> _Connection:
        connection = _Connection(self._argv)
        hello = connection.hello
        self.level, self.mechanisms, self.failures = hello["level"], hello["mechanisms"], hello["failures"]
        if LEVELS.index(self.level) > LEVELS.index(self.accept):
            connection.close()
            raise SandboxUnavailable(
                f"refusing to run untrusted code: this host only supports isolation level {self.level!r} "
                f"but {self.accept!r} is required. Why the stronger levels failed: {self.failures}. "
                f"Mechanisms found: {self.mechanisms}. To accept the weaker level explicitly, set "
                f"{ISOLATION_ENV}={self.level} (or Sandbox(accept={self.level!r})).")
        return connection

    @property
    def _process(self) -> subprocess.Popen:
        return self._connection.process

    def submit(self, job: dict) -> Future:
        """Queue a job; a server that has died is replaced first (its pending jobs have failed)."""
        job_id = str(next(self._ids))
        data = (json.dumps({**job, "id": job_id}) + "\n").encode()
        with self._lock:
            if self._connection.dead:
                self._connection.close()
                self._connection = self._connect()
                self.restarts += 1
            connection = self._connection
        return connection.submit(job_id, data)

    def restart(self, reason: str) -> None:
        """Give up on the running server (e.g. an answer is overdue): its pending jobs fail now and
        the next job starts a new one."""
        self._connection._fail(reason)

    def wait(self, future: Future, deadline_s: float) -> RunResult:
        """The run's result, or a failed one if the server does not answer within `deadline_s` or dies."""
        try:
            return future.result(timeout=max(0.0, deadline_s))
        except FutureTimeout:
            reason = f"no answer from the sandbox server within {deadline_s:.0f} s; restarting it"
            self.restart(reason)
            return RunResult.failed(reason, self.level)
        except SandboxUnavailable as exc:
            return RunResult.failed(str(exc), self.level)

    def run(self, argv: list[str], timeout_s: float = 10.0, memory_mb: int = 512, workdir: str | None = None,
            stdin: str = "") -> RunResult:
        """Run a program isolated (looked up on the jail's PATH: the interpreter's bin, /usr/bin, /bin)."""
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"argv={argv!r}: give the program to run and its arguments, as strings")
        timeout_s, memory_mb = check_limits(timeout_s, memory_mb)
        if workdir is not None and not os.path.isdir(workdir):
            raise ValueError(f"workdir {workdir!r} is not a directory")
        job = {"kind": "exec", "argv": list(argv), "timeout_s": timeout_s, "memory_mb": memory_mb,
               "workdir": os.path.abspath(workdir) if workdir else None, "stdin": stdin}
        return self.wait(self.submit(job), timeout_s + REPLY_MARGIN_S + START_TIMEOUT_S)

    def run_harness(self, request: dict, timeout_s: float, memory_mb: int) -> Future:
        timeout_s, memory_mb = check_limits(timeout_s, memory_mb)
        return self.submit({"kind": "harness", "request": request, "timeout_s": timeout_s, "memory_mb": memory_mb})

    def grade(self, problem: dict):
        from sandbox.grading import grade_with

        return grade_with(self, [problem])[0]

    def grade_many(self, problems: list[dict]) -> list:
        from sandbox.grading import grade_with

        return grade_with(self, problems)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
