"""The supervisor side: start the fork server, check its isolation level against what the caller
accepts, send it jobs and hand back results. Safe to use from a multi-threaded trainer: the only
fork happens in the server, a fresh single-threaded process. The server dies with the thread that
started it (parent-death signal) or when its request pipe closes, so start it from a long-lived
thread (the trainer's main thread does)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import sysconfig
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.jail import LEVELS

ROOT = Path(__file__).resolve().parent.parent
ISOLATION_ENV = "R1_SANDBOX_ISOLATION"  # the weakest level a user accepts: full | namespaces | none


class SandboxUnavailable(RuntimeError):
    """The host cannot isolate untrusted code at the level the caller requires."""


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


@dataclass
class Limits:
    """Per-run limits; `slots` runs at once. Two per CPU core by default: part of each run's time is
    spent waiting (pipes, process exit and namespace teardown), not on the CPU. Memory is bounded by
    slots x the per-run memory limit."""
    slots: int = field(default_factory=lambda: 2 * (os.cpu_count() or 1))
    workdir_mb: int = 64
    processes: int = 64
    output_cap: int = 1 << 20
    result_cap: int = 16 << 20


def _interpreter() -> tuple[str, list[str], list[str]]:
    """The base interpreter (not a venv's), the prefixes the jail must see, and site-packages to hide."""
    executable = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefixes = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)})
    prefixes = [p for p in prefixes if not p.startswith("/usr/") and p != "/usr"]
    base_vars = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    sites = {os.path.realpath(sysconfig.get_path(k, vars=base_vars)) for k in ("purelib", "platlib")}
    return executable, prefixes, sorted(s for s in sites if os.path.isdir(s))


class Sandbox:
    def __init__(self, accept: str | None = None, limits: Limits | None = None):
        accept = accept or os.environ.get(ISOLATION_ENV, "full")
        if accept not in LEVELS:
            raise ValueError(f"accept={accept!r}: must be one of {LEVELS} (strongest first)")
        self.limits = limits or Limits()
        executable, prefixes, hide = _interpreter()
        config = {"slots": self.limits.slots, "workdir_mb": self.limits.workdir_mb,
                  "processes": self.limits.processes, "output_cap": self.limits.output_cap,
                  "result_cap": self.limits.result_cap, "prefixes": prefixes, "hide": hide}
        # The server loads the package's modules without its __init__ (which imports this module and,
        # through it, threading, subprocess and concurrent.futures): every module whose at-fork hooks
        # run in each jail costs page faults there.
        boot = (f"import sys, types; package = types.ModuleType('sandbox'); "
                f"package.__path__ = [{str(ROOT / 'sandbox')!r}]; sys.modules['sandbox'] = package; "
                "from sandbox.server import main; main()")
        self._process = subprocess.Popen([executable, "-I", "-S", "-B", "-c", boot, json.dumps(config)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={}, cwd="/",
                                         start_new_session=True)
        line = self._process.stdout.readline()
        if not line:
            raise SandboxUnavailable(f"the sandbox server did not start (exit {self._process.wait()})")
        hello = json.loads(line)
        self.level, self.mechanisms, self.failures = hello["level"], hello["mechanisms"], hello["failures"]
        if LEVELS.index(self.level) > LEVELS.index(accept):
            self.close()
            raise SandboxUnavailable(
                f"refusing to run untrusted code: this host only supports isolation level {self.level!r} "
                f"but {accept!r} is required. Why the stronger levels failed: {self.failures}. "
                f"Mechanisms found: {self.mechanisms}. To accept the weaker level explicitly, set "
                f"{ISOLATION_ENV}={self.level} (or Sandbox(accept={self.level!r})).")
        self._ids = itertools.count()
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_replies, daemon=True, name="sandbox-replies")
        self._reader.start()

    def _read_replies(self) -> None:
        for line in self._process.stdout:
            reply = json.loads(line)
            with self._lock:
                future = self._futures.pop(reply.pop("id"))
            future.set_result(RunResult(**reply))
        with self._lock:
            for future in self._futures.values():
                future.set_exception(SandboxUnavailable("the sandbox server exited"))
            self._futures.clear()

    def submit(self, job: dict) -> Future:
        future = Future()
        job_id = str(next(self._ids))
        data = (json.dumps({**job, "id": job_id}) + "\n").encode()
        with self._lock:
            if self._process.poll() is not None:
                raise SandboxUnavailable("the sandbox server has exited")
            self._futures[job_id] = future
            self._process.stdin.write(data)
            self._process.stdin.flush()
        return future

    def run(self, argv: list[str], timeout_s: float = 10.0, memory_mb: int = 512, workdir: str | None = None,
            stdin: str = "") -> RunResult:
        """Run a program isolated (looked up on the jail's PATH: the interpreter's bin, /usr/bin, /bin)."""
        if not argv:
            raise ValueError("argv is empty: give the program to run")
        if workdir is not None and not os.path.isdir(workdir):
            raise ValueError(f"workdir {workdir!r} is not a directory")
        job = {"kind": "exec", "argv": list(argv), "timeout_s": float(timeout_s), "memory_mb": int(memory_mb),
               "workdir": os.path.abspath(workdir) if workdir else None, "stdin": stdin}
        return self.submit(job).result()

    def run_harness(self, request: dict, timeout_s: float, memory_mb: int) -> Future:
        return self.submit({"kind": "harness", "request": request, "timeout_s": float(timeout_s),
                            "memory_mb": int(memory_mb)})

    def grade(self, problem: dict):
        from sandbox.grading import grade_with

        return grade_with(self, [problem])[0]

    def grade_many(self, problems: list[dict]) -> list:
        from sandbox.grading import grade_with

        return grade_with(self, problems)

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
