"""Synthetic coding tasks with unit tests, for the code reward (rewards/code.py) in the embedded
default. Each generator takes a random.Random and returns one task in the sandbox's problem format
(DESIGN.md contract 3): function_call, stdio or assert tests, and a reference solution that passes
them. Columns: prompt, solution (the reference as a fenced python block), reasoning, kind, format,
entry_point, tests (JSON text: Arrow cannot hold mixed-type test inputs), test_code."""

import json
import random
import string

from datasets import DatasetDict

from .synthetic import split_distinct

CODING_KINDS = ("affine", "count_char", "power_sum", "count_divisible", "scaled_sum", "repeat_line", "clamp")
COLUMNS = ("prompt", "solution", "reasoning", "kind", "format", "entry_point", "tests", "test_code")
NUM_TESTS = 4


def _task(prompt, code, reasoning, fmt, entry_point="", tests=(), test_code="") -> dict:
    return {"prompt": prompt, "solution": f"```python\n{code}```", "reasoning": reasoning, "format": fmt,
            "entry_point": entry_point, "tests": json.dumps(list(tests)), "test_code": test_code}


def _int_lists(rng: random.Random) -> list[list[int]]:
    return [[rng.randint(-20, 20) for _ in range(rng.randint(0, 6))] for _ in range(NUM_TESTS)]


def _affine(rng):
    a, b = rng.randint(2, 20), rng.randint(-20, 20)
    xs = [rng.randint(-50, 50) for _ in range(NUM_TESTS)]
    return _task(f"Write a Python function `affine(x)` that returns {a} * x + {b}.",
                 f"def affine(x):\n    return {a} * x + {b}\n", f"Multiply x by {a}, then add {b}.",
                 "function_call", "affine", [{"input": [x], "output": a * x + b} for x in xs])


def _count_char(rng):
    c = rng.choice(string.ascii_lowercase)
    words = ["".join(rng.choice(c + "abcxyz") for _ in range(rng.randint(0, 8))) for _ in range(NUM_TESTS)]
    return _task(f"Write a Python function `count_char(s)` that returns how many times the character '{c}' occurs in s.",
                 f"def count_char(s):\n    return s.count({c!r})\n", f"str.count counts the '{c}' characters.",
                 "function_call", "count_char", [{"input": [w], "output": w.count(c)} for w in words])


def _power_sum(rng):
    k = rng.randint(1, 4)
    lists = _int_lists(rng)
    return _task(f"Write a Python function `power_sum(xs)` that returns the sum of x ** {k} over the list xs.",
                 f"def power_sum(xs):\n    return sum(x ** {k} for x in xs)\n", f"Raise each element to the power {k} and add.",
                 "function_call", "power_sum", [{"input": [xs], "output": sum(x ** k for x in xs)} for xs in lists])


def _count_divisible(rng):
    d = rng.randint(2, 12)
    lists = _int_lists(rng)
    return _task(f"Write a Python function `count_divisible(xs)` that returns how many elements of xs are divisible by {d}.",
                 f"def count_divisible(xs):\n    return sum(1 for x in xs if x % {d} == 0)\n",
                 f"Count the x with x % {d} == 0.", "function_call", "count_divisible",
                 [{"input": [xs], "output": sum(1 for x in xs if x % d == 0)} for xs in lists])


def _scaled_sum(rng):
    m = rng.randint(1, 20)
    lists = [[rng.randint(-99, 99) for _ in range(rng.randint(1, 6))] for _ in range(NUM_TESTS)]
    return _task(f"Read integers separated by spaces from standard input and print their sum multiplied by {m}.",
                 f"print(sum(map(int, input().split())) * {m})\n", f"Split the line, add the integers, multiply by {m}.",
                 "stdio", "", [{"input": " ".join(map(str, xs)) + "\n", "output": f"{sum(xs) * m}\n"} for xs in lists])


def _repeat_line(rng):
    k = rng.randint(2, 6)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 6))) for _ in range(NUM_TESTS)]
    return _task(f"Read one line from standard input and print it {k} times, one per line.",
                 f"line = input()\nfor _ in range({k}):\n    print(line)\n", f"Read the line once, print it in a loop of {k}.",
                 "stdio", "", [{"input": w + "\n", "output": (w + "\n") * k} for w in words])


def _clamp(rng):
    lo = rng.randint(-20, 10)
    hi = lo + rng.randint(1, 20)
    xs = [lo - 5, lo, (lo + hi) // 2, hi, hi + 7]
    asserts = "".join(f"    assert candidate({x}) == {min(max(x, lo), hi)}\n" for x in xs)
    return _task(f"Write a Python function `clamp(x)` that returns x limited to the range [{lo}, {hi}].",
                 f"def clamp(x):\n    return min(max(x, {lo}), {hi})\n", f"Raise x to {lo} if below, lower it to {hi} if above.",
                 "assert", "clamp", test_code=f"def check(candidate):\n{asserts}")


_GENERATORS = {"affine": _affine, "count_char": _count_char, "power_sum": _power_sum,
               "count_divisible": _count_divisible, "scaled_sum": _scaled_sum, "repeat_line": _repeat_line,
               "clamp": _clamp}
assert tuple(_GENERATORS) == CODING_KINDS


def build_coding(num_train: int, num_heldout: int, seed: int, kinds: list[str] | None = None) -> DatasetDict:
    kinds = list(kinds or CODING_KINDS)
    unknown = [k for k in kinds if k not in _GENERATORS]
    if unknown or not kinds:
        raise ValueError(f"unknown or no coding kinds {unknown or kinds}; allowed: {', '.join(CODING_KINDS)}")
    rng = random.Random(seed)

    def draw() -> dict:
        kind = rng.choice(kinds)
        return {**_GENERATORS[kind](rng), "kind": kind}

    return split_distinct(draw, num_train, num_heldout, COLUMNS, what=f"coding tasks of kinds {kinds}")
