"""Isolated execution of untrusted programs and grading of their tests (DESIGN.md contract 3).

    import sandbox
    sandbox.grade({"format": "function_call", "solution": "def add(a, b):\\n    return a + b\\n",
                   "entry_point": "add", "tests": [{"input": [1, 2], "output": 3}]}).passed   # True

`grade` and `run` use one shared Sandbox (a fork server with two slots per CPU core), started on
first use. It refuses to start when the host cannot give full isolation unless the user accepts a
weaker level (R1_SANDBOX_ISOLATION=namespaces|none, or Sandbox(accept=...)). Standard library only."""

import atexit
import threading

from sandbox.client import ISOLATION_ENV, Limits, RunResult, Sandbox, SandboxUnavailable
from sandbox.grading import FORMATS, GradeResult, TestResult

__all__ = ["grade", "grade_many", "run", "shared", "Sandbox", "Limits", "GradeResult", "TestResult", "RunResult",
           "SandboxUnavailable", "FORMATS", "ISOLATION_ENV"]

_shared: Sandbox | None = None
_shared_lock = threading.Lock()


def shared() -> Sandbox:
    """The process-wide Sandbox, started on first use and closed at exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Sandbox()
            atexit.register(_shared.close)
        return _shared


def grade(problem: dict) -> GradeResult:
    return shared().grade(problem)


def grade_many(problems: list[dict]) -> list[GradeResult]:
    return shared().grade_many(problems)


def run(argv: list[str], **kwargs) -> RunResult:
    return shared().run(argv, **kwargs)
