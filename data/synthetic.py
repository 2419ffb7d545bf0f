"""Synthetic math problems with exact answers and short step-by-step workings.

Each generator takes a random.Random and max_operand and returns
(prompt, solution, reasoning). Workings are digit-wise / partial-product-wise
so a tiny model can imitate them during SFT.
"""

import hashlib
import random
import re
from fractions import Fraction
from math import gcd

from datasets import Dataset, DatasetDict, concatenate_datasets

SYNTHETIC_KINDS = ("add", "sub", "mul", "linear", "fraction", "collect")

# Give up after this many draws in a row that add nothing new: the space of
# distinct problems is then (practically) exhausted.
_MAX_FRUITLESS_DRAWS = 20_000


def _digits(n: int) -> list[int]:
    """Digits of n >= 0, ones first."""
    return [int(c) for c in reversed(str(n))]


def add_working(*numbers: int, dropped_carry: int | None = None) -> tuple[int, str]:
    """(the result, the column-by-column working) of the sum of `numbers`. With `dropped_carry` = i,
    the carry out of column i (ones = 0) is written down but not added into the next column: the
    classic slip, carried through to a wrong result."""
    columns = [_digits(n) for n in numbers]
    steps, carry, digits = [], 0, []
    for i in range(max(map(len, columns))):
        terms = [d[i] for d in columns if i < len(d)] + ([carry] if carry and dropped_carry != i - 1 else [])
        s = sum(terms)
        carry = s // 10
        digits.append(s % 10)
        line = f"{' + '.join(map(str, terms))} = {s}, digit {s % 10}"
        steps.append(line + (f" carry {carry}" if carry else ""))
    if carry:
        steps.append(f"digit {carry}")
        digits.append(carry)
    result = int("".join(map(str, reversed(digits))))
    steps.append(f"{' + '.join(map(str, numbers))} = {result}")
    return result, "\n".join(steps)


def carries(*numbers: int) -> list[int]:
    """The columns of the sum of `numbers` (ones = 0) that carry into a next column of digits."""
    columns = [_digits(n) for n in numbers]
    width = max(map(len, columns))
    out, carry = [], 0
    for i in range(width):
        carry = (sum(d[i] for d in columns if i < len(d)) + carry) // 10
        if carry and i + 1 < width:
            out.append(i)
    return out


_ADDITION = re.compile(r"What is (\d+(?: \+ \d+)+)\?")


def addition_terms(prompt: str) -> list[int] | None:
    """The numbers an 'add' problem's prompt sums, or None for any other prompt."""
    match = _ADDITION.fullmatch(prompt)
    return [int(n) for n in match[1].split(" + ")] if match else None


def _add(rng: random.Random, m: int, addends: int = 2) -> tuple[str, str, str]:
    numbers = [rng.randint(0, m) for _ in range(addends)]
    result, working = add_working(*numbers)
    return f"What is {' + '.join(map(str, numbers))}?", str(result), working


def _column_subtract(big: int, small: int) -> list[str]:
    db, ds = _digits(big), _digits(small)
    steps, borrow = [], 0
    for i, top in enumerate(db):
        bottom = ds[i] if i < len(ds) else 0
        top -= borrow
        borrow = int(top < bottom)
        if borrow:
            steps.append(f"{top + 10} - {bottom} = {top + 10 - bottom}, borrow 1")
        else:
            steps.append(f"{top} - {bottom} = {top - bottom}")
    return steps


def _sub(rng: random.Random, m: int) -> tuple[str, str, str]:
    a, b = rng.randint(0, m), rng.randint(0, m)
    if a >= b:
        steps = _column_subtract(a, b) + [f"{a} - {b} = {a - b}"]
    else:
        steps = [f"{a} < {b}, so {a} - {b} = -({b} - {a})"]
        steps += _column_subtract(b, a) + [f"{b} - {a} = {b - a}", f"{a} - {b} = {a - b}"]
    return f"What is {a} - {b}?", str(a - b), "\n".join(steps)


def _mul(rng: random.Random, m: int) -> tuple[str, str, str]:
    a, b = rng.randint(0, m), rng.randint(0, m)
    partials = [d * 10**i for i, d in enumerate(_digits(b)) if d]
    steps = []
    if len(partials) > 1:
        steps = [f"{a} * {p} = {a * p}" for p in partials]
        steps.append(f"{' + '.join(str(a * p) for p in partials)} = {a * b}")
    steps.append(f"{a} * {b} = {a * b}")
    return f"What is {a} * {b}?", str(a * b), "\n".join(steps)


def _linear(rng: random.Random, m: int) -> tuple[str, str, str]:
    a, x, b = rng.randint(2, m), rng.randint(-m, m), rng.randint(-m, m)
    c = a * x + b
    lhs = f"{a}*x" + (f" + {b}" if b > 0 else f" - {-b}" if b < 0 else "")
    steps = []
    if b:
        move = f"{c} - {b}" if b > 0 else f"{c} + {-b}"
        steps.append(f"{a}*x = {move} = {c - b}")
    steps.append(f"x = {c - b} / {a} = {x}")
    return f"Solve for x: {lhs} = {c}", str(x), "\n".join(steps)


def _fraction(rng: random.Random, m: int) -> tuple[str, str, str]:
    p, q, r, s = rng.randint(1, m), rng.randint(2, m), rng.randint(1, m), rng.randint(2, m)
    den = q * s // gcd(q, s)
    n1, n2 = p * den // q, r * den // s
    steps = [f"lcm({q}, {s}) = {den}"]
    steps += [f"{n}/{d} = {n * den // d}/{den}" for n, d in ((p, q), (r, s)) if d != den]
    steps.append(f"{n1}/{den} + {n2}/{den} = {n1 + n2}/{den}")
    total = Fraction(n1 + n2, den)
    if total.denominator != den:
        g = gcd(n1 + n2, den)
        steps.append(f"gcd({n1 + n2}, {den}) = {g}, so {n1 + n2}/{den} = {total}")
    return f"What is {p}/{q} + {r}/{s}?", str(total), "\n".join(steps)


def _collect(rng: random.Random, m: int) -> tuple[str, str, str]:
    var = rng.choice("xyz")
    coeffs = [rng.randint(1, m) * rng.choice((1, -1)) for _ in range(rng.randint(2, 4))]

    def signed(c: int, first: bool) -> str:
        if first:
            return str(c)
        return f" + {c}" if c >= 0 else f" - {-c}"

    expr = "".join(signed(c, i == 0) + f"*{var}" for i, c in enumerate(coeffs))
    steps, acc = [], coeffs[0]
    for c in coeffs[1:]:
        steps.append(f"{acc}{signed(c, False)} = {acc + c}")
        acc += c
    answer = "0" if acc == 0 else var if acc == 1 else f"-{var}" if acc == -1 else f"{acc}*{var}"
    summed = "".join(signed(c, i == 0) for i, c in enumerate(coeffs))
    steps.append(f"({summed})*{var} = {answer}")
    return f"Simplify: {expr}", answer, "\n".join(steps)


_GENERATORS = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "linear": _linear,
    "fraction": _fraction,
    "collect": _collect,
}
assert tuple(_GENERATORS) == SYNTHETIC_KINDS


def is_heldout(prompt: str) -> bool:
    """Stable split: the same prompt lands in the same split on every run/seed."""
    return int(hashlib.sha1(prompt.encode("utf-8")).hexdigest(), 16) % 10 == 0


def generate_problem(kind: str, rng: random.Random, max_operand: int = 99, addends: int = 2) -> dict:
    if kind not in _GENERATORS:
        raise ValueError(f"unknown problem kind {kind!r}; allowed kinds: {', '.join(SYNTHETIC_KINDS)}")
    extra = {"addends": addends} if kind == "add" else {}
    prompt, solution, reasoning = _GENERATORS[kind](rng, max_operand, **extra)
    return {"prompt": prompt, "solution": solution, "reasoning": reasoning, "kind": kind}


def build_synthetic(
    num_train: int,
    num_heldout: int,
    seed: int,
    kinds: list[str],
    max_operand: int = 99,
    shortcut_fraction: float = 0.0,
    slip_fraction: float = 0.0,
    addends: int = 2,
) -> DatasetDict:
    """`num_train` and `num_heldout` distinct problems. With `shortcut_fraction` f, that share of the
    training problems appears a second time with only the workings' last line as its reasoning
    ("65 - 62 = 3"): the answer stated without working out, as cold-start data often states it. A
    model that imitates both styles must choose between them for every question; which one pays is
    what RL can find out (the learning demo, README). The train split then has num_train * (1 + f) rows.

    With `slip_fraction` s, that share of the worked-out training additions whose working carries into
    a next column drop one such carry: the working and its stated answer (column `stated`) are wrong,
    the gold `solution` stays right. Cold-start data written by hand has such slips; a model that imitates
    it makes them at about that rate, and only a reward for the right answer can train them out.
    Held-out problems and the answer-only rows never have one.

    `addends`: how many numbers each 'add' problem sums. With three, a carry can be 2 and the sum is
    out of reach of a tiny model in one step, while each column of the working stays a small sum."""
    kinds = list(kinds)
    if not kinds:
        raise ValueError(f"kinds is empty; allowed kinds: {', '.join(SYNTHETIC_KINDS)}")
    for kind in kinds:
        if kind not in _GENERATORS:
            raise ValueError(f"unknown problem kind {kind!r}; allowed kinds: {', '.join(SYNTHETIC_KINDS)}")
    if max_operand < 2:
        raise ValueError(f"max_operand={max_operand} is too small; it must be >= 2")
    if addends < 2:
        raise ValueError(f"addends={addends} must be >= 2 (the numbers each 'add' problem sums)")
    if addends != 2 and "add" not in kinds:
        raise ValueError(f"addends={addends} needs the 'add' kind; kinds={kinds}")
    if not 0.0 <= shortcut_fraction <= 1.0:
        raise ValueError(f"shortcut_fraction={shortcut_fraction} must be between 0 and 1")
    if not 0.0 <= slip_fraction <= 1.0:
        raise ValueError(f"slip_fraction={slip_fraction} must be between 0 and 1")
    if slip_fraction and "add" not in kinds:
        raise ValueError(f"slip_fraction={slip_fraction} needs the 'add' kind (its slips are dropped carries); "
                         f"kinds={kinds}")

    rng = random.Random(seed)
    splits = split_distinct(
        lambda: generate_problem(rng.choice(kinds), rng, max_operand, addends), num_train, num_heldout,
        columns=("prompt", "solution", "reasoning", "kind"),
        what=f"problems with kinds={kinds} and max_operand={max_operand}; lower the counts or raise max_operand",
    )
    if shortcut_fraction:
        train = splits["train"]
        count = round(shortcut_fraction * num_train)
        chosen = sorted(random.Random(f"shortcut:{seed}").sample(range(num_train), count))
        shortcuts = train.select(chosen).map(lambda row: {"reasoning": row["reasoning"].splitlines()[-1]})
        splits["train"] = concatenate_datasets([train, shortcuts])
    if slip_fraction:
        splits["train"] = _with_slips(splits["train"], num_train, slip_fraction, seed)
    return splits


def _with_slips(train: Dataset, num_worked: int, fraction: float, seed: int) -> Dataset:
    """`train` with a `stated` column (the answer its working states), after dropping one carry in
    `fraction` of the first `num_worked` rows' additions that carry (see build_synthetic)."""
    rng = random.Random(f"slips:{seed}")
    rows = train.to_list()
    for index, row in enumerate(rows):
        row["stated"] = row["solution"]
        numbers = addition_terms(row["prompt"]) if index < num_worked and row["kind"] == "add" else None
        if numbers is None:
            continue
        columns = carries(*numbers)
        if columns and rng.random() < fraction:
            result, row["reasoning"] = add_working(*numbers, dropped_carry=rng.choice(columns))
            row["stated"] = str(result)
    return Dataset.from_list(rows)


def split_distinct(draw, num_train: int, num_heldout: int, columns: tuple[str, ...], what: str) -> DatasetDict:
    """Call `draw()` until each split has its count. A prompt's split is fixed by its hash, so train and
    held-out never overlap; repeated prompts are dropped. `what` describes the problems in the error
    raised when too few distinct ones exist."""
    if num_train < 0 or num_heldout < 0:
        raise ValueError(f"num_train={num_train} and num_heldout={num_heldout} must be >= 0")
    want = {"train": num_train, "heldout": num_heldout}
    rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    seen: set[str] = set()
    fruitless = 0
    while any(len(rows[s]) < want[s] for s in rows):
        if fruitless >= _MAX_FRUITLESS_DRAWS:
            raise ValueError(
                f"could only generate {len(rows['train'])} train and {len(rows['heldout'])} held-out distinct "
                f"{what} (asked for num_train={num_train}, num_heldout={num_heldout})"
            )
        problem = draw()
        split = "heldout" if is_heldout(problem["prompt"]) else "train"
        if problem["prompt"] in seen or len(rows[split]) >= want[split]:
            fruitless += 1
            continue
        fruitless = 0
        seen.add(problem["prompt"])
        rows[split].append(problem)
    return DatasetDict({s: Dataset.from_dict({c: [r[c] for r in rows[s]] for c in columns}) for s in rows})
