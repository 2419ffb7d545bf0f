"""Grading outside the sandbox (DESIGN.md contract 3). The jail gets the solution and the test
inputs; it sends back what the solution produced; the expected outputs stay here and are compared
here, on plain decoded values, so nothing the solution does inside can forge a pass.

- function_call: `input` is the argument list, `output` the return value (JSON-style comparison:
  tuples as lists, floats to 1e-9 relative, bool never equal to int).
- stdio: `input` is stdin, `output` the expected stdout; every line must match (trailing
  whitespace and trailing blank lines aside) and the program must exit 0.
- assert (HumanEval): each top-level `assert <expr> == <literal>` of `check` is rewritten so that
  the jail reports `<expr>` and the literal is compared here. Other statements of `check` still run
  inside; their verdict is the jail's own report, weaker evidence (see `GradeResult.self_reported`).

All tests of one completion run in one sandbox run; `timeout_s` bounds that whole run."""

from __future__ import annotations

import ast
import json
import math
from dataclasses import asdict, dataclass, field

FORMATS = ("function_call", "stdio", "assert")
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 512


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
    self_reported: bool = False           # part of the verdict came from inside the sandbox
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


def rewrite_check(test_code: str) -> tuple[str, list, bool]:
    """Split `assert <expr> == <literal>` out of `check`: returns (test code that reports `<expr>`
    through __r1_emit(k, ...) instead, the literals by k, whether other asserts remain inside)."""
    tree = ast.parse(test_code)
    literals, residual = [], False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            node.body = [_rewrite(stmt, literals) for stmt in node.body]
            residual = any(isinstance(n, ast.Assert) for stmt in node.body for n in ast.walk(stmt))
    return ast.unparse(ast.fix_missing_locations(tree)), literals, residual


def _rewrite(stmt: ast.stmt, literals: list) -> ast.stmt:
    test = stmt.test if isinstance(stmt, ast.Assert) else None
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return stmt
    sides = [test.left, test.comparators[0]]
    for expr, literal in (sides, sides[::-1]):
        try:
            value = ast.literal_eval(literal)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        literals.append(value)
        thunk = ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
                           body=expr)
        call = ast.Call(ast.Name("__r1_emit", ast.Load()), [ast.Constant(len(literals) - 1), thunk], [])
        return ast.copy_location(ast.Expr(call), stmt)
    return stmt


def build_request(problem: dict) -> tuple[dict, list, bool]:
    """(what the jail gets, what stays here to compare against, whether part of the verdict will
    be the jail's own report)."""
    validate(problem)
    fmt = problem["format"]
    source = (problem.get("prompt") or "") + problem["solution"] if fmt == "assert" else problem["solution"]
    request = {"format": fmt, "source": source, "entry_point": problem.get("entry_point", ""),
               "timeout_s": float(problem.get("timeout_s", DEFAULT_TIMEOUT_S))}
    if fmt == "assert":
        request["check_code"], expected, residual = rewrite_check(problem["test_code"])
        return request, expected, residual
    request["inputs"] = [t["input"] for t in problem["tests"]]
    return request, [t["output"] for t in problem["tests"]], False


def decode(value):
    """Type-tagged JSON from the jail back to plain builtins; anything malformed raises ValueError."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [decode(v) for v in value]
    if type(value) is not dict or len(value) != 1:
        raise ValueError(f"malformed value {value!r:.100}")
    (tag, payload), = value.items()
    try:
        if tag == "float":
            return float(payload)
        if tag == "tuple":
            return tuple(decode(v) for v in payload)
        if tag == "set":
            return frozenset(decode(v) for v in payload)
        if tag == "dict":
            return {decode(k): decode(v) for k, v in payload}
        if tag == "bytes":
            return bytes.fromhex(payload)
        if tag == "complex":
            return complex(float(payload[0]), float(payload[1]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed {tag} value: {exc}") from None
    raise ValueError(f"unknown value tag {tag!r}")


def json_equal(got, want) -> bool:
    """Equality for function_call tests whose expected outputs come from JSON."""
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        if isinstance(want, float) or isinstance(got, float):
            return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9) or (got != got and want != want)
        return got == want
    if isinstance(want, list) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(json_equal(g, w) for g, w in zip(got, want))
    if isinstance(want, dict) and isinstance(got, dict):
        got = {k if isinstance(k, str) else json.dumps(k): v for k, v in got.items()}
        return got.keys() == want.keys() and all(json_equal(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want


def stdout_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def score(problem: dict, expected: list, residual: bool, run) -> GradeResult:
    records, error = [], None
    for line in run.result.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            error = "malformed result line"
    load_error = next((r["load_error"] for r in records if isinstance(r, dict) and "load_error" in r), None)
    by_index = {}
    for r in records:
        if isinstance(r, dict) and type(r.get("i")) is int and r["i"] not in by_index:
            by_index[r["i"]] = r
    tests = [_score_test(problem["format"], want, by_index.get(i)) for i, want in enumerate(expected)]
    checks = [r for r in records if isinstance(r, dict) and "check" in r]
    if problem["format"] == "assert" and (residual or not tests):
        completed = [r["check"] for r in checks] == ["completed"]
        detail = "" if completed else (checks[0].get("error", "") if checks else "no report")
        tests.append(TestResult(completed, "the other asserts of check(), self-reported: " + detail))
    elif checks and checks[0]["check"] != "completed":
        error = error or checks[0].get("error")
    passed_count = sum(t.passed for t in tests)
    fraction = passed_count / len(tests) if tests else 0.0
    status = run.status if run.status != "exited" else ("exited" if run.exit_code == 0 else "error")
    passed = bool(tests) and passed_count == len(tests) and run.ok and load_error is None and error is None
    return GradeResult(passed, fraction if run.status != "sandbox_error" else 0.0, status, tests, residual,
                       load_error or error or run.error or (None if passed else run.stderr[-2000:] or None),
                       run.wall_s)


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
        got = record.get("stdout")
        ok = isinstance(got, str) and stdout_lines(got) == stdout_lines(want)
        return TestResult(ok, "" if ok else f"stdout {str(got)[:200]!r} != expected {want[:200]!r}")
    try:
        got = decode(record.get("value"))
    except (ValueError, RecursionError) as exc:
        return TestResult(False, str(exc))
    ok = json_equal(got, want) if fmt == "function_call" else _python_equal(got, want)
    return TestResult(ok, "" if ok else f"got {got!r:.200} expected {want!r:.200}")


def _python_equal(got, want) -> bool:
    """HumanEval's own `==`, safe here because both sides are decoded builtins."""
    try:
        return bool(got == want)
    except RecursionError:
        return False


def grade_with(sandbox, problems: list[dict]) -> list[GradeResult]:
    """Grade many problems concurrently on the sandbox's pool (one run per problem)."""
    jobs = []
    for problem in problems:
        request, expected, residual = build_request(problem)
        memory = int(problem.get("memory_mb", DEFAULT_MEMORY_MB))
        jobs.append((problem, expected, residual, sandbox.run_harness(request, request["timeout_s"], memory)))
    return [score(problem, expected, residual, future.result()) for problem, expected, residual, future in jobs]
