"""Code datasets' tests mapped to the sandbox's problem format (DESIGN.md contract 3), in the columns
data/coding.py writes and rewards/code.py grades: prompt, solution (the dataset's reference solution
fenced as a completion writes it; "" where it has none), format, entry_point, tests (JSON text),
test_code, and `id` where the dataset has one.

`data.test_format` names the dataset's convention; each is read from the dataset's own columns:
- kodcode (KodCode-V1: question_id, question, solution, test, test_info): pytest-style `test_*`
  functions after `from solution import f`. They move into the `check(candidate)` of an assert
  problem, which calls each in turn, so the sandbox decides every assert (sandbox/asserts.py); `f`
  is the candidate there.
- apps (APPS, and TACO, which keeps APPS's columns: problem_id, question, solutions, starter_code,
  input_output): `input_output` is JSON text {inputs, outputs[, fn_name]}. With fn_name, a
  function_call problem; APPS wraps each expected return value in a one-element list (its grader
  accepts the value or the list), which is taken off. Without, stdio; a list of lines is the lines
  joined. The starter code, when there is one, follows the question.
- humaneval (openai_humaneval: task_id, prompt, canonical_solution, test, entry_point): `test`
  defines `check(candidate)`; an assert problem whose `code_prefix` is the prompt (its imports and
  helpers, which evaluation prepends).

A row the sandbox cannot grade the way its dataset means is a DataError naming the row (or, with
`data.invalid_rows: drop`, left out with a warning): a class under test, a LeetCode `class Solution`
method (the sandbox calls a top-level function), tests that need pytest or another package (the
sandbox has the standard library only), malformed JSON or Python. Never a task that no completion
can pass.
"""

import ast
import json
import sys
import textwrap

from datasets import Dataset

from rewards.code import problem_for
from sandbox.grading import DEFAULT_TIMEOUT_S, build_request

from .errors import DataError, row_name, unusable

TEST_FORMATS = ("kodcode", "apps", "humaneval")


class _Ungradable(ValueError):
    """Why the sandbox cannot grade one row's tests."""


def fenced(code: str) -> str:
    """Code as a completion writes it, the way rewards/code.py finds it."""
    return f"```python\n{code.rstrip()}\n```" if code.strip() else ""


def _humaneval_question(prompt: str) -> str:
    return ("Complete the following Python function. Reply with the complete function in a "
            f"```python code block.\n\n```python\n{prompt}```")


def _parse(source: str, what: str) -> ast.Module:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError) as exc:
        raise _Ungradable(f"{what} is not valid Python: {exc}") from None


def _json(text, what: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise _Ungradable(f"{what} is not JSON text: {exc}") from None


def _standard_library_only(tree: ast.Module, what: str) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        else:
            continue
        for module in modules:
            if module.split(".")[0] not in sys.stdlib_module_names:
                raise _Ungradable(f"{what} imports {module!r}; the sandbox has the standard library only")


def _without_solution_imports(tree: ast.Module) -> tuple[list[str], list[ast.stmt]]:
    """(the names a KodCode test imports from its `solution` module, the test's other statements)."""
    names, kept = [], []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "solution":
            if any(alias.asname for alias in node.names):
                raise _Ungradable("its test imports from solution under another name")
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.Import) and any(alias.name == "solution" for alias in node.names):
            raise _Ungradable("its test imports the module solution; an assert problem binds one function")
        else:
            kept.append(node)
    return names, kept


def _check_running(statements: list[ast.stmt]) -> str:
    """Test code whose `check(candidate)` defines the `test_*` functions and calls each in turn."""
    tests = [node for node in statements if isinstance(node, ast.FunctionDef) and node.name.startswith("test")]
    if not tests:
        raise _Ungradable("its test defines no test_* function")
    for test in tests:
        if test.decorator_list or ast.unparse(test.args):
            raise _Ungradable(f"{test.name} takes pytest fixtures or parameters")
    helpers = "".join(ast.unparse(node) + "\n\n" for node in statements if node not in tests)
    inner = "".join(textwrap.indent(ast.unparse(test), "    ") + "\n" for test in tests)
    calls = "".join(f"    {test.name}()\n" for test in tests)
    return f"{helpers}def check(candidate):\n{inner}{calls}"


def kodcode_problem(row: dict) -> dict:
    names, kept = _without_solution_imports(_parse(row["test"], "its test"))
    if names == ["*"]:
        names = [info["function_name"] for info in row.get("test_info") or []]
    if len(names) != 1:
        raise _Ungradable(f"its tests use {names or 'nothing'} from solution; an assert problem grades one function")
    entry = names[0]
    reference = row.get("solution") or ""
    if any(isinstance(node, ast.ClassDef) and node.name == entry for node in _parse(reference, "its solution").body):
        raise _Ungradable(f"{entry!r} is a class; an assert problem calls a function")
    _standard_library_only(ast.Module(body=kept, type_ignores=[]), "its test")
    return {"prompt": row["question"], "solution": fenced(reference), "format": "assert", "entry_point": entry,
            "tests": "[]", "test_code": _check_running(kept)}


def _unwrapped(output):
    return output[0] if isinstance(output, list) and len(output) == 1 else output


def _stdio_text(value, what: str) -> str:
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return "\n".join(value)
    if not isinstance(value, str):
        raise _Ungradable(f"a stdio {what} is {type(value).__name__}, not text")
    return value


def apps_problem(row: dict) -> dict:
    spec = _json(row["input_output"], "its input_output")
    if not (isinstance(spec, dict) and isinstance(spec.get("inputs"), list) and isinstance(spec.get("outputs"), list)):
        raise _Ungradable("its input_output is not a JSON object with 'inputs' and 'outputs' lists")
    inputs, outputs = spec["inputs"], spec["outputs"]
    if not inputs or len(inputs) != len(outputs):
        raise _Ungradable(f"its input_output has {len(inputs)} inputs and {len(outputs)} outputs")
    starter = row.get("starter_code") or ""
    entry = spec.get("fn_name") or ""
    if entry:
        if "class Solution" in starter:
            raise _Ungradable(f"{entry!r} is a method of LeetCode's class Solution; function_call calls a function")
        if not all(isinstance(args, list) for args in inputs):
            raise _Ungradable("its function-call inputs are not argument lists")
        tests = [{"input": args, "output": _unwrapped(output)} for args, output in zip(inputs, outputs)]
    else:
        tests = [{"input": _stdio_text(stdin, "input"), "output": _stdio_text(stdout, "output")}
                 for stdin, stdout in zip(inputs, outputs)]
    solutions = _json(row.get("solutions") or "[]", "its solutions")
    reference = solutions[0] if isinstance(solutions, list) and solutions and isinstance(solutions[0], str) else ""
    question = row["question"] + (f"\n\n{fenced(starter)}" if starter.strip() else "")
    return {"prompt": question, "solution": fenced(reference), "format": "function_call" if entry else "stdio",
            "entry_point": entry, "tests": json.dumps(tests), "test_code": ""}


def humaneval_problem(row: dict) -> dict:
    tree = _parse(row["test"], "its test")
    if not any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in tree.body):
        raise _Ungradable("its test defines no check(candidate)")
    reference = row["prompt"] + (row.get("canonical_solution") or "")
    return {"prompt": _humaneval_question(row["prompt"]), "solution": fenced(reference), "format": "assert",
            "entry_point": row["entry_point"], "tests": "[]", "test_code": row["test"], "code_prefix": row["prompt"]}


# test_format: (the row's problem, the dataset columns it reads, the dataset's id column)
ADAPTERS = {
    "kodcode": (kodcode_problem, ("question", "solution", "test"), "question_id"),
    "apps": (apps_problem, ("question", "input_output"), "problem_id"),
    "humaneval": (humaneval_problem, ("task_id", "prompt", "test", "entry_point"), "task_id"),
}
assert tuple(ADAPTERS) == TEST_FORMATS


def adapt_tests(ds: Dataset, test_format: str, split: str, invalid_rows: str = "error") -> Dataset:
    """Every row as a sandbox problem, checked as the code reward will build it (with an empty
    program in place of a completion), so a malformed row fails here, before any work."""
    problem_of, needs, id_column = ADAPTERS[test_format]
    missing = [column for column in needs if column not in ds.column_names]
    if missing:
        raise DataError(f"{split} data lacks column(s) {missing} that test_format={test_format!r} reads; "
                        f"dataset columns: {ds.column_names}")
    has_id = id_column in ds.column_names
    rows, bad = [], []
    for index, row in enumerate(ds):
        try:
            problem = problem_of(row)
            build_request(problem_for(problem, "", DEFAULT_TIMEOUT_S))
        except (ValueError, SyntaxError) as why:
            bad.append(f"{row_name(index, row.get(id_column))}: {why}")
            continue
        rows.append({"id": str(row[id_column]), **problem} if has_id else problem)
    unusable(split, f"cannot be graded as sandbox problems (data.test_format={test_format!r})", bad, len(ds),
             invalid_rows)
    return Dataset.from_list(rows)
