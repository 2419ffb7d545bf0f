"""The code reward: the last fenced python block of a completion, graded on the row's tests in the
local sandbox (sandbox/, DESIGN.md contract 3).

Dataset columns, named after the sandbox's problem fields: `format` (function_call | stdio | assert;
empty or missing on rows that are not coding tasks, which then get None), `tests` (a list, or its
JSON text, of {input, output}), `entry_point`, `test_code` (assert format), `code_prefix` (code run
before the completion's: a benchmark prompt's imports and helpers) and `timeout_s`.
Every completion of a batch is graded concurrently on the sandbox's pool."""

import json
import re

import sandbox
from rewards.registry import register
from rewards.text import completion_text

CODE_BLOCK = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)
SCORINGS = ("binary", "fraction")


def extract_code(text: str) -> str | None:
    """The last fenced python (or untagged) block, None when there is none."""
    blocks = CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


def problem_for(row: dict, code: str, default_timeout_s: float) -> dict:
    tests = row.get("tests")
    if isinstance(tests, str):
        tests = json.loads(tests) if tests.strip() else []
    problem = {"format": row["format"], "solution": code, "tests": tests or [],
               "timeout_s": float(row.get("timeout_s") or default_timeout_s)}
    for key in ("entry_point", "test_code"):
        if row.get(key):
            problem[key] = row[key]
    if row.get("code_prefix"):
        # The sandbox runs prompt + solution for assert problems. Always prepending the benchmark's
        # prompt keeps its imports and helpers (HumanEval/38's encode_cyclic) even when the completion
        # rewrites the whole function; a later def wins. Training (this reward) and evaluation agree.
        problem["prompt"] = row["code_prefix"]
    return problem


@register("code", columns=("format",))
def code_reward(prompts, completions, completion_ids=None, *, scoring: str = "binary", timeout_s: float = 10.0,
                memory_mb: int = 512, **columns) -> list[float | None]:
    """1.0 when every test passes (`scoring: fraction`: the fraction of tests passed), 0.0 for no
    code block or a failing run, None for rows without a `format` (not coding tasks)."""
    if scoring not in SCORINGS:
        raise ValueError(f"code reward: scoring={scoring!r} must be one of {SCORINGS}")
    names = [k for k in ("format", "tests", "entry_point", "test_code", "code_prefix", "timeout_s") if k in columns]
    rows = [dict(zip(names, values)) for values in zip(*(columns[k] for k in names))] if names else []
    if len(rows) != len(completions):
        raise ValueError("code reward needs the dataset column 'format' (function_call | stdio | assert)")
    rewards: list[float | None] = [None] * len(completions)
    problems, where = [], []
    for i, (completion, row) in enumerate(zip(completions, rows)):
        if not row.get("format"):
            continue
        code = extract_code(completion_text(completion))
        if code is None:
            rewards[i] = 0.0
            continue
        problem = problem_for(row, code, timeout_s)
        problem["memory_mb"] = memory_mb
        problems.append(problem)
        where.append(i)
    for i, result in zip(where, sandbox.grade_many(problems)):
        rewards[i] = float(result.passed) if scoring == "binary" else result.fraction
    return rewards
