"""Converts math-verify 0.9.0's public test suite into benchmarks/data/math_verify_suite.jsonl, once,
so that the benchmark never downloads anything at run time.

    pip download math-verify==0.9.0 --no-binary :all: --no-deps -d /tmp/mv
    tar xzf /tmp/mv/math_verify-0.9.0.tar.gz -C /tmp/mv
    python benchmarks/data/convert_math_verify_tests.py /tmp/mv/math_verify-0.9.0/tests

Every `@pytest.mark.parametrize` case of a test that compares a gold with a prediction becomes one
row: the file, the test, gold, pred, the label the test asserts, and how the test calls math-verify
(`call`: the `compare_strings` options, or "parse_verify" for a plain `verify(parse(g), parse(p))`).
The test modules are executed with stand-ins for `pytest` and `math_verify` that only record the
parametrize lists. Tests of parse() internals, configs and timeouts compare no pair and are skipped.
Origin: https://pypi.org/project/math-verify/0.9.0/ (sdist, tests/), (c) 2024 The HuggingFace Team,
MIT License (the header of tests/test_all.py; the package metadata says Apache 2.0).
"""

from __future__ import annotations

import ast
import json
import math
import sys
import types
from pathlib import Path

OUT = Path(__file__).resolve().parent / "math_verify_suite.jsonl"


def _stand_ins() -> None:
    def parametrize(names, values, **_):
        def mark(fn):
            fn.cases = ([n.strip() for n in names.split(",")] if isinstance(names, str) else list(names), values)
            return fn
        return mark

    pytest = types.ModuleType("pytest")
    pytest.mark = types.SimpleNamespace(parametrize=parametrize)
    pytest.param = lambda *values, **_: values
    pytest.raises = None
    sys.modules["pytest"] = pytest
    for name in ("math_verify", "math_verify.grader", "math_verify.parser", "math_verify.errors"):
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr: (lambda *a, **k: None)
        sys.modules[name] = module


def _call_options(source: str) -> dict[str, dict]:
    """Per test function: the keyword options it passes to compare_strings (or parse_verify)."""
    options = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
            continue
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "compare_strings":
                options[node.name] = {k.arg: (ast.literal_eval(k.value) if not isinstance(k.value, ast.Name)
                                              else {"param": k.value.id}) for k in call.keywords}
            elif isinstance(call, ast.Call) and getattr(call.func, "id", None) == "verify" and \
                    all(isinstance(a, ast.Call) and getattr(a.func, "id", None) == "parse" and len(a.args) == 1
                        for a in call.args):
                options.setdefault(node.name, "parse_verify")
    return options


def main(tests_dir: str) -> None:
    _stand_ins()
    rows = []
    for path in sorted(Path(tests_dir).glob("test_*.py")):
        source = path.read_text()
        if "parametrize" not in source:
            continue
        namespace = {"__name__": path.stem, "math": math}
        sys.modules.setdefault("tests", types.ModuleType("tests"))
        exec(compile(source, str(path), "exec"), namespace)  # noqa: S102  (upstream test code, one-off)
        if path.stem == "test_all":
            sys.modules["tests.test_all"] = types.SimpleNamespace(compare_strings=None)
        for test, call in _call_options(source).items():
            if not hasattr(namespace[test], "cases"):
                continue  # test_precision: sympy_expr_eq internals plus one pair at precision=4
            names, values = namespace[test].cases
            for case in values:
                args = dict(zip(names, case))
                label = args.get("expected", args.get("result"))
                options = call if call == "parse_verify" else \
                    {k: (args[v["param"]] if isinstance(v, dict) else v) for k, v in call.items()}
                rows.append({"file": path.name, "test": test, "gold": args["gold"], "pred": args["pred"],
                             "equivalent": bool(label), "call": options})
    OUT.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"{len(rows)} cases -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
