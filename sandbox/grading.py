"""Grading outside the sandbox (DESIGN.md contract 3). The jail gets the solution and the test
inputs; it sends back what the solution produced; the expected outputs stay here and are compared
here, on plain decoded values, so nothing the solution does inside can forge a pass.

- function_call: `input` is the argument list, `output` the return value (JSON-style comparison:
  tuples as lists, floats to 1e-9 relative when a float is expected or returned, integers exactly,
  bool never equal to int).
- stdio: `input` is stdin, `output` the expected stdout; every line must match (trailing spaces,
  tabs and carriage returns, and trailing blank lines aside) and the program must exit 0; output
  beyond the cap fails the test.
- assert (HumanEval): every assert of `check` is split into values the test code computes and a
  predicate evaluated here (sandbox/asserts.py); the test code runs in a checker process the
  candidate cannot reach (sandbox/harness.py). Asserts left to the checker (inside a `try`) are
  counted in `GradeResult.checker_asserts`.

All tests of one completion run in one sandbox run; `timeout_s` bounds that whole run. Whatever the
jail sends back, scoring a problem never raises: a malformed or hostile report is a failed grade."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field

from sandbox import asserts, values
from sandbox.client import REPLY_MARGIN_S, START_TIMEOUT_S, RunResult, SandboxUnavailable
from sandbox.jail import check_limits

FORMATS = ("function_call", "stdio", "assert")
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 512
logger = logging.getLogger(__name__)


@dataclass
class TestResult:
    passed: bool
    detail: str = ""


@dataclass
class GradeResult:
    passed: bool
    fraction: float                       # tests passed / tests
    status: str                           # the run's status: exited, timeout, memory, output_limit, ...
    tests: list[TestResult] = field(default_factory=list)
    checker_asserts: int = 0              # asserts decided by the checker process, not here
    error: str | None = None
    wall_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def validate(problem: dict) -> None:
    if not isinstance(problem, dict):
        raise ValueError(f"a problem must be a JSON object, got {type(problem).__name__}")
    fmt = problem.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"problem format {fmt!r} is not one of {FORMATS}")
    if not isinstance(problem.get("solution"), str):
        raise ValueError("problem 'solution' must be python source text")
    check_limits(problem.get("timeout_s", DEFAULT_TIMEOUT_S), problem.get("memory_mb", DEFAULT_MEMORY_MB))
    if fmt == "assert":
        for key in ("test_code", "entry_point"):
            if not isinstance(problem.get(key), str) or not problem[key]:
                raise ValueError(f"an 'assert' problem needs {key!r} (a non-empty string)")
        return
    tests = problem.get("tests")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, dict) and {"input", "output"} <= t.keys()
                                                            for t in tests):
        raise ValueError(f"a {fmt!r} problem needs 'tests': a non-empty list of {{'input', 'output'}}")
    if fmt == "function_call":
        if not isinstance(problem.get("entry_point"), str) or not problem["entry_point"]:
            raise ValueError("a 'function_call' problem needs 'entry_point' (the function's name)")
        if not all(isinstance(t["input"], list) for t in tests):
            raise ValueError("function_call test inputs must be argument lists")
    elif not all(isinstance(t["input"], str) and isinstance(t["output"], str) for t in tests):
        raise ValueError("stdio test inputs and outputs must be text")


@dataclass
class Expectation:
    """What stays here: the expected outputs, or the asserts' predicates and how many asserts the
    checker decides itself."""
    expected: list
    checker_asserts: int = 0


def build_request(problem: dict) -> tuple[dict, Expectation]:
    """(what the jail gets, what stays here to compare against)."""
    validate(problem)
    fmt = problem["format"]
    source = (problem.get("prompt") or "") + problem["solution"] if fmt == "assert" else problem["solution"]
    request = {"format": fmt, "source": source, "entry_point": problem.get("entry_point", ""),
               "timeout_s": float(problem.get("timeout_s", DEFAULT_TIMEOUT_S))}
    if fmt == "assert":
        request["check_code"], predicates, residual, shared = asserts.rewrite_check(problem["test_code"],
                                                                                   problem["entry_point"])
        request["check_prompt"] = problem.get("prompt") or ""
        request["checker"] = "shared" if shared else "separate"
        return request, Expectation(predicates, residual)
    request["inputs"] = [t["input"] for t in problem["tests"]]
    return request, Expectation([t["output"] for t in problem["tests"]])


def json_equal(got, want) -> bool:
    """Equality for function_call tests whose expected outputs come from JSON."""
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        if isinstance(want, float) or isinstance(got, float) and not isinstance(want, int):
            return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9) or (got != got and want != want)
        return got == want  # an integer answer is exact: 1000000006.0 is not 1000000007
    if isinstance(want, list) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(json_equal(g, w) for g, w in zip(got, want))
    if isinstance(want, dict) and isinstance(got, dict):
        if not all(isinstance(k, (str, int, float, bool)) or k is None for k in got):
            return False  # JSON objects have text keys; bytes, tuples... cannot match
        got = {k if isinstance(k, str) else json.dumps(k): v for k, v in got.items()}
        return got.keys() == want.keys() and all(json_equal(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want


def stdout_lines(text: str) -> list[str]:
    lines = [line.rstrip(" \t\r") for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def score(problem: dict, expectation: Expectation, run) -> GradeResult:
    """The grade of one run; never raises (whatever the jail wrote is data, not trusted code)."""
    try:
        return _score(problem, expectation, run)
    except Exception as exc:  # noqa: BLE001 - a hostile report must fail its own grade, not the batch
        return GradeResult(False, 0.0, "grader_error", error=f"could not score the run: {exc!r}"[:2000],
                           wall_s=run.wall_s, checker_asserts=expectation.checker_asserts)


def _score(problem: dict, expectation: Expectation, run) -> GradeResult:
    records, error = [], None
    for line in run.result.splitlines():
        try:
            record = values.loads(line)
        except ValueError as exc:
            error = str(exc)
            continue
        if isinstance(record, dict):
            records.append(record)
    load_error = next((str(r["load_error"])[:2000] for r in records if "load_error" in r), None)
    by_index: dict[int, list[dict]] = {}
    for r in records:
        if type(r.get("i")) is int:
            by_index.setdefault(r["i"], []).append(r)
    fmt = problem["format"]
    if fmt == "assert":
        tests = [_score_assert(predicate, text, by_index.get(i, [])) for i, (predicate, text)
                 in enumerate(expectation.expected)]
    else:
        tests = [_score_test(fmt, want, (by_index.get(i) or [None])[0]) for i, want in enumerate(expectation.expected)]
    checks = [r.get("check") for r in records if "check" in r]
    if fmt == "assert":
        completed = checks == ["completed"]
        if not completed:
            failure = next((r.get("error") for r in records if r.get("check") == "failed"), None)
            error = error or str(failure or "the test code did not complete")[:2000]
        if expectation.checker_asserts or not tests:
            tests.append(TestResult(completed, "the asserts the checker process decided"))
    passed_count = sum(t.passed for t in tests)
    fraction = passed_count / len(tests) if tests else 0.0
    status = run.status if run.status != "exited" else ("exited" if run.exit_code == 0 else "error")
    passed = bool(tests) and passed_count == len(tests) and run.ok and load_error is None and error is None
    return GradeResult(passed, fraction if run.status != "sandbox_error" else 0.0, status, tests,
                       expectation.checker_asserts,
                       load_error or error or run.error or (None if passed else run.stderr[-2000:] or None),
                       run.wall_s)


def _score_assert(predicate, text: str, reports: list[dict]) -> TestResult:
    """An assert passes when the test code reached it and its predicate held every time."""
    if not reports:
        return TestResult(False, f"assert {text}: not reached")
    for report in reports:
        if "error" in report:
            return TestResult(False, f"assert {text}: {str(report['error'])[:500]}")
        try:
            ok = asserts.holds(predicate, values.decode(report.get("value")))
        except Exception as exc:  # noqa: BLE001 - whatever the values, a failed assert
            return TestResult(False, f"assert {text}: {type(exc).__name__}: {str(exc)[:200]}")
        if not ok:
            return TestResult(False, f"assert {text}: does not hold")
    return TestResult(True)


def _score_test(fmt: str, want, record: dict | None) -> TestResult:
    if record is None:
        return TestResult(False, "no result (the run ended before this test)")
    if "error" in record:
        return TestResult(False, str(record["error"])[:500])
    if fmt == "stdio":
        if record.get("timeout"):
            return TestResult(False, "timeout")
        if record.get("exit") != 0:
            return TestResult(False, f"exit status {record.get('exit')}")
        if record.get("truncated"):
            return TestResult(False, "output over the size limit")
        got = record.get("stdout")
        ok = isinstance(got, str) and stdout_lines(got) == stdout_lines(want)
        return TestResult(ok, "" if ok else f"stdout {str(got)[:200]!r} != expected {want[:200]!r}")
    try:
        got = values.decode(record.get("value"))
        ok = json_equal(got, want)
    except (ValueError, TypeError, RecursionError) as exc:
        return TestResult(False, str(exc)[:500])
    return TestResult(ok, "" if ok else f"got {str(got)[:200]} expected {str(want)[:200]}")


def grade_with(sandbox, problems: list[dict]) -> list[GradeResult]:
    """Grade many problems concurrently on the sandbox's pool (one run per problem). Problems are
    validated first (a bad problem is the caller's error: ValueError); after that nothing raises.
    Every answer has a deadline: the job's own time limit, plus its wait behind the batch's earlier
    jobs on the pool's slots, plus margins."""
    requests = [build_request(problem) for problem in problems]
    start, queued_s, jobs = time.monotonic(), 0.0, []
    for problem, (request, expectation) in zip(problems, requests):
        try:
            future = sandbox.run_harness(request, request["timeout_s"],
                                         int(problem.get("memory_mb", DEFAULT_MEMORY_MB)))
        except SandboxUnavailable as exc:  # the server could not be (re)started
            future = RunResult.failed(str(exc), sandbox.level)
        queued_s += request["timeout_s"] + REPLY_MARGIN_S
        deadline = start + START_TIMEOUT_S + queued_s / sandbox.limits.slots + request["timeout_s"] + REPLY_MARGIN_S
        jobs.append((problem, expectation, future, deadline))
    results = []
    for problem, expectation, future, deadline in jobs:
        run = future if isinstance(future, RunResult) else sandbox.wait(future, deadline - time.monotonic())
        result = score(problem, expectation, run)
        if result.status == "sandbox_error":
            logger.warning("sandbox: a grading failed for a reason of the sandbox's own: %s", result.error)
        results.append(result)
    return results
