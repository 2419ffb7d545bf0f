"""A normalised answer string as a value: a number, a sympy expression, a collection, a relation,
a multiple-choice letter or text.

Numbers in the usual notations (integers, decimals, fractions, `\\frac`, mixed numbers, scientific
notation) are read exactly as `Fraction`s without sympy; that fast path is safe to run in the caller.
Everything else goes through latex2sympy2_extended's ANTLR grammar (measured against sympy's lark
LaTeX parser on our pairs: it parses sets, intervals and `\\sqrt{}` sums that lark rejects, and is
about 4x faster), and only inside a worker process (`parse`), behind static guards against input
that would make the parser or sympy explode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_DEPTH = 8  # bracket nesting; the ANTLR parser is exponential in it (depth 20 braces: 30 s)
MAX_SYMPY_CHARS = 300
MAX_DIGITS = 200

# Letter runs that are mathematics, not words; any other run of 3+ letters makes an answer text.
_MATH_WORDS = {"sqrt", "frac", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "pi", "infty",
               "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "cdot", "times", "div", "pm", "mp", "le",
               "leq", "ge", "geq", "ne", "neq", "lt", "gt", "begin", "end", "pmatrix", "bmatrix", "matrix",
               "vmatrix", "cup", "cap", "emptyset", "varnothing", "binom", "dbinom", "choose", "max", "min",
               "gcd", "lcm", "theta", "alpha", "beta", "gamma", "delta", "lambda", "mu", "sigma", "phi",
               "omega", "circ", "mathbb", "overline", "hat", "vec", "int", "sum", "prod", "lim", "to", "infinity",
               "oo", "sgn", "abs", "det", "mod", "pmod", "bmod", "in", "notin", "subset", "cfrac", "dfrac",
               "tfrac", "operatorname", "emptyset", "ldots", "cdots", "dots"}
_WORD = re.compile(r"(?<!\\)\b[a-zA-Z]{3,}\b|(?<![\\a-zA-Z])[a-zA-Z]{3,}")

_INT = r"[+-]?\d+"
_NUMBER = re.compile(r"([+-]?)(\d*\.?\d+(?:[eE][+-]?\d+)?)(?:\s*(?:\\times|\\cdot|\*|x)\s*10\^\{?([+-]?\d+)\}?)?")
_FRACTION = re.compile(rf"({_INT})\s*/\s*(\d+)")
_LATEX_FRACTION = re.compile(r"([+-]?)(\d+)?\s*\\frac\s*(?:\{\s*([+-]?\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
_CHOICE = re.compile(r"\(?([A-J])\)?|\(([A-J])\)\s+\S.*")  # (C) 12: the letter is the answer
_BASE = re.compile(r"([0-9A-Za-z]+)_\{?(\d+)\}?")  # 1011_2: a numeral in base 2, never the number 1011


@dataclass(frozen=True)
class Answer:
    """`kind` is one of: number, expr, set, tuple, list, interval, matrix, relation, choice, text.
    `value`: a Fraction (number), a sympy object (expr, interval, matrix, relation), a tuple of
    Answers (set, tuple, list) or a str (choice, text). `exact` is False for numbers written as
    decimals, so that they meet irrational values with a relative tolerance, never exactly; `places`
    is how many digits such a decimal has after its point (see math_equiv's rounding rule)."""
    kind: str
    value: object
    exact: bool = True
    places: int = 0


def parse_number(s: str) -> Answer | None:
    """The exact fast path: plain numbers, a/b, \\frac{a}{b}, mixed numbers, 1.5\\times10^{3}."""
    if len(s) > MAX_DIGITS:
        return None
    match = _NUMBER.fullmatch(s)
    if match:
        sign, digits, power = match.groups()
        if ("e" in digits.lower() and abs(int(re.split("[eE]", digits)[1])) > MAX_DIGITS) or \
                (power and abs(int(power)) > MAX_DIGITS):
            return None
        value = Fraction(digits) * (10 ** Fraction(int(power)) if power else 1)
        decimal = "." in digits and "e" not in digits.lower() and not power
        return Answer("number", -value if sign == "-" else value, exact="." not in digits and "e" not in digits.lower(),
                      places=len(digits.split(".")[1]) if decimal else 0)
    match = _FRACTION.fullmatch(s)
    if match and int(match.group(2)) != 0:
        return Answer("number", Fraction(int(match.group(1)), int(match.group(2))))
    match = _LATEX_FRACTION.fullmatch(s)
    if match:
        sign, whole, num_braced, num_digit, den_braced, den_digit = match.groups()
        numerator, denominator = int(num_braced or num_digit), int(den_braced or den_digit)
        if denominator == 0 or (whole and numerator < 0):
            return None
        value = int(whole or 0) + Fraction(numerator, denominator)  # 3\frac{1}{2} is a mixed number
        return Answer("number", -value if sign == "-" else value)
    return None


def is_text(s: str) -> bool:
    return any(word.lower() not in _MATH_WORDS for word in _WORD.findall(s))


def depth(s: str) -> int:
    level = deepest = 0
    for char in s:
        if char in "([{":
            level += 1
            deepest = max(deepest, level)
        elif char in ")]}":
            level -= 1
    return deepest


def balanced(s: str) -> bool:
    """Brackets close in order (`}{` and `}}}2{{{` are not answers) and environments close."""
    level = 0
    for char in s:
        level += char in "([{"
        level -= char in ")]}"
        if level < 0:
            return False
    return level == 0 and s.count("{") == s.count("}") and s.count("\\begin") == s.count("\\end")


def wrapped(s: str) -> bool:
    """Does the bracket opening s[0] close at s[-1]? ("(1,2)" yes, "(1,2),(3,4)" no)"""
    if not s or s[0] not in "([" or s[-1] not in ")]":
        return False
    level = 0
    for i, char in enumerate(s):
        level += char in "([{"
        level -= char in ")]}"
        if level == 0:
            return i == len(s) - 1
    return False


def split_top(s: str, separator: str = ",") -> list[str]:
    """Split at separators outside any brackets."""
    parts, level, start = [], 0, 0
    for i, char in enumerate(s):
        if char in "([{":
            level += 1
        elif char in ")]}":
            level -= 1
        elif level == 0 and s.startswith(separator, i):
            parts.append(s[start:i])
            start = i + len(separator)
    parts.append(s[start:])
    return [part.strip() for part in parts]


def parse_cheap(s: str) -> Answer | None:
    """What the caller's process may decide without sympy: numbers, choice letters, text."""
    if not s:
        return None
    choice = _CHOICE.fullmatch(s)
    if choice:
        return Answer("choice", choice.group(1) or choice.group(2))
    base = _BASE.fullmatch(s)
    if base and base.group(2) != "10" and not base.group(1).isalpha():
        return Answer("text", f"{base.group(1).casefold()}_{base.group(2)}")
    number = parse_number(s)
    if number is not None:
        return number
    if "\\" not in s and "{" not in s and is_text(s):
        return Answer("text", " ".join(s.casefold().split()))
    return None


def parse(s: str) -> Answer | None:
    """Any normalised answer; None when it is not an answer (empty, malformed, or over the guards).
    Runs in a worker: latex2sympy and sympy may take long, and the pool bounds them."""
    cheap = parse_cheap(s)
    if cheap is not None:
        return cheap
    if not s or not balanced(s) or depth(s) > MAX_DEPTH or len(s) > MAX_SYMPY_CHARS:
        return None
    if is_text(s):
        return Answer("text", " ".join(s.casefold().split()))
    matrix = _MATRIX.fullmatch(s)
    if matrix and "\\begin" not in matrix.group(2):  # one matrix, not a sum or product of them
        return _matrix(matrix.group(2))
    if "\\cup" in s and len(split_top(s, "\\cup")) > 1:
        return _union(split_top(s, "\\cup"))
    if s.startswith("\\{") and s.endswith("\\}") and "\\cup" not in s:
        items = [parse(item) for item in split_top(s[2:-2]) if item]
        return None if None in items else Answer("set", tuple(items))
    if "\\pm" not in s and "\\cup" not in s:
        items = split_top(s)
        if len(items) > 1:
            if wrapped(s) and len(split_top(s[1:-1])) > 1:
                return _bracketed(s)
            parsed = [parse(item) for item in items]
            return None if None in parsed else Answer("list", tuple(parsed))
        if wrapped(s) and len(split_top(s[1:-1])) > 1:
            return _bracketed(s)
    sides = split_top(s, "=")
    if len(sides) == 2 and all(sides):
        lhs, rhs = parse(sides[0]), parse(sides[1])
        if lhs is None or rhs is None:
            return None
        return Answer("relation", ("=", lhs, rhs))
    return _sympy(s)


_MATRIX = re.compile(r"\\begin\{([pb]matrix)\}(.*)\\end\{\1\}", re.DOTALL)


def _matrix(body: str) -> Answer | None:
    """A pmatrix/bmatrix of parsed cells, without the LaTeX grammar (it is 20x slower on them)."""
    from sympy import Matrix

    from rewards.math_equiv import to_sympy
    rows = [row for row in body.split("\\\\") if row.strip()]
    cells = [[parse(cell.strip()) for cell in row.split("&")] for row in rows]
    if not cells or len({len(row) for row in cells}) != 1:
        return None
    values = [[to_sympy(cell) if cell is not None and cell.kind in ("number", "expr") else None for cell in row]
              for row in cells]
    return None if any(v is None for row in values for v in row) else Answer("matrix", Matrix(values))


def _union(parts: list[str]) -> Answer | None:
    """(1,2) \\cup [3,4) \\cup \\{5\\}: the union of its intervals and finite sets."""
    from sympy import FiniteSet, Interval, Union

    from rewards.math_equiv import to_sympy
    sets = []
    for part in parts:
        answer = parse(part)
        if answer is None:
            return None
        if answer.kind == "tuple" and len(answer.value) == 2:
            low, high = (to_sympy(item) for item in answer.value)
            answer = None if low is None or high is None else Answer("interval", Interval.open(low, high))
        elif answer.kind == "set":
            items = [to_sympy(item) for item in answer.value]
            answer = None if None in items else Answer("interval", FiniteSet(*items))
        if answer is None or answer.kind != "interval":
            return None
        sets.append(answer.value)
    return Answer("interval", Union(*sets))


def _bracketed(s: str) -> Answer | None:
    """(a, b) is a tuple (it also meets an open interval); [a, b], (a, b], [a, b) are intervals."""
    items = [parse(item) for item in split_top(s[1:-1])]
    if None in items:
        return None
    if len(items) == 2 and (s[0], s[-1]) != ("(", ")"):
        from sympy import Interval

        from rewards.math_equiv import to_sympy
        low, high = to_sympy(items[0]), to_sympy(items[1])
        if low is None or high is None:
            return None
        try:
            return Answer("interval", Interval(low, high, s[0] == "(", s[-1] == ")"))
        except (TypeError, ValueError):
            return None
    return Answer("tuple", tuple(items))


def _sympy(s: str) -> Answer | None:
    from latex2sympy2_extended import latex2sympy
    from sympy import Expr, FiniteSet, MatrixBase, Set
    from sympy.logic.boolalg import Boolean

    from rewards.math_fastparse import parse_plain

    plain = re.sub(r"\*\*", "^", s)
    plain = re.sub(r"(?<!\\)\b(sqrt|sin|cos|tan|log|ln|exp|pi)\b", r"\\\1", plain)
    plain = re.sub(r"\\sqrt\s*\(([^()]*)\)", r"\\sqrt{\1}", plain)
    value = parse_plain(plain)  # plain algebra and relations without the ANTLR grammar (20x faster)
    if value is None:
        try:
            value = latex2sympy(plain)
        except Exception:  # the grammar rejects malformed LaTeX with assorted exception types
            return None
    if getattr(value, "is_Matrix", False) and not isinstance(value, MatrixBase):
        try:  # a sum or product of explicit matrices: its entries (sizes are bounded by MAX_SYMPY_CHARS)
            value = value.doit()
        except Exception:  # shapes that do not match
            return None
    if isinstance(value, MatrixBase):
        return Answer("matrix", value)
    if isinstance(value, FiniteSet):  # x = \pm 2, 1 \pm \sqrt{2}
        return Answer("set", tuple(Answer("expr", item) for item in value.args))
    if isinstance(value, Set):
        return Answer("interval", value)  # unions of intervals and sets
    if isinstance(value, Expr):
        return Answer("expr", value)
    if isinstance(value, Boolean) and value.free_symbols:
        return Answer("relation", value)  # x \le 3; 1 < x < 2 arrives as And(1 < x, x < 2)
    return None
