"""Whether two parsed answers are the same mathematical object.

Policies (each a deliberate choice against reward hacking, see reference/math-checker.md §3):
- Rational numbers compare exactly, big integers included. A decimal meets an irrational or a float
  within a relative tolerance `REL_TOL`; there is no absolute rounding and no factor-100 rule.
  A decimal meets a rational it does not equal exactly when it is that rational rounded or cut at
  its last written digit and written to at least `REL_TOL` relative precision: `0.0833333333333333`
  meets `\\frac{1}{12}`, `0.0833` and `0.333333` do not meet theirs, `1000000.5` never meets `1000001`.
- Expressions: structural equality, else numeric agreement at 30 digits on every one of several
  fixed points (both sides must have the same free symbols). No unbounded `simplify`.
- Sets are sets (`\\{1,2,2\\}` meets `\\{1,2\\}`); bare lists are unordered multisets (`1, 2, 2` does
  not meet `1, 2`), except lists of tuples, which are solution sets (a repeated `(3, 7)` is one);
  tuples are ordered; intervals compare endpoints and open/closed ends; matrices compare shape and
  entries; a one-element collection meets its item.
- Sums and products compare up to the name of their index (`\\sum_i i^2` meets `\\sum_j j^2`) and up
  to the order of commuting factors and terms (sympy's canonical order).
- `x = 2` meets `2` in both directions when the left side is a single symbol, or when both sides are
  numbers (`65 + 62 = 127` meets 127; `7 = 11a + c` is an equation and does not meet `11a + c`);
  two equations are equal when one is a non-zero multiple of the other, inequalities when by a
  positive multiple; a one-variable relation meets the interval or set it describes.
- Multiple-choice letters meet only the same letter; text meets only the same text (case-insensitive).
- Inputs whose value would explode (power towers, factorials of large numbers) compare structurally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from contextvars import ContextVar
from fractions import Fraction

import sympy
from sympy import Rational

from rewards.math_parse import Answer

REL_TOL = 1e-6  # decimals against irrationals, and any float
EXACT_TOL = 1e-20  # two exact values evaluated at 30 digits
MAX_NODES = 400
MAX_BITS = 50_000  # a value above 2**MAX_BITS is never evaluated
MAX_DIGITS = 2_000  # most digits used to tell two exact values apart


@dataclasses.dataclass(frozen=True)
class Options:
    """math-verify's comparison options under its own names, so that its test suite can be run the
    way its tests call it; the defaults are this checker's rules.
    - `float_rounding`: two numbers meet when they agree rounded to this many decimal places (None:
      the decimal rule above).
    - `strict`: False renames the prediction's free symbols to the gold's, in sorted order (`f(y)`
      meets `f(x)`), and lets a set meet a tuple of the same elements.
    - `allow_set_relation_comp`: False is math-verify's asymmetry: a gold interval or set does not
      meet a relation (`x \\in [-2, 7]` against `-2 \\le x \\le 7`); a gold relation still meets the
      interval it describes."""

    float_rounding: int | None = None
    strict: bool = True
    allow_set_relation_comp: bool = True

    def __post_init__(self):
        if self.float_rounding is not None and (isinstance(self.float_rounding, bool) or
                                                not isinstance(self.float_rounding, int) or self.float_rounding < 0):
            raise ValueError(f"float_rounding = {self.float_rounding!r} must be None or a whole number of places >= 0")


DEFAULT_OPTIONS = Options()
OPTIONS: ContextVar[Options] = ContextVar("math_check_options", default=DEFAULT_OPTIONS)


@contextlib.contextmanager
def compared_under(options: Options):
    """`equal` and what it calls read `options` while this is open (in the caller or a worker)."""
    token = OPTIONS.set(options)
    try:
        yield
    finally:
        OPTIONS.reset(token)

_POINTS = (Rational(-37, 27), Rational(61, 100), Rational(229, 100), Rational(37, 10), Rational(-1, 7))


def to_sympy(answer: Answer):
    if answer.kind == "number":
        value = answer.value
        return Rational(value.numerator, value.denominator)
    if answer.kind == "expr":
        return answer.value
    if answer.kind == "relation" and isinstance(answer.value, tuple):
        lhs, rhs = (to_sympy(side) for side in answer.value[1:])
        return None if lhs is None or rhs is None else sympy.Eq(lhs, rhs, evaluate=False)
    if answer.kind in ("relation", "interval", "matrix"):
        return answer.value
    return None


def _bits(expr) -> float:
    """An upper bound of log2(|value| + 1) for numeric subtrees (inf when it cannot tell cheaply)."""
    if expr.is_Integer or expr.is_Rational:
        return math.log2(abs(expr.p) / expr.q + 1)
    if expr.is_Pow:
        base, exponent = expr.args
        if exponent.is_number and exponent.is_negative and base.is_Rational and abs(base) >= 1:
            return 1.0  # |b^-e| <= 1
        exponent_bits = _bits(exponent)
        if exponent_bits > 64:
            return math.inf
        return (2 ** exponent_bits) * max(_bits(base), 1)
    if isinstance(expr, sympy.factorial):
        argument_bits = _bits(expr.args[0])
        return math.inf if argument_bits > 40 else (2 ** argument_bits) * argument_bits
    if expr.is_Add:  # |a + b| <= 2 max(|a|, |b|)
        return max(_bits(arg) for arg in expr.args) + 1
    if expr.is_Mul or isinstance(expr, sympy.Function):
        return sum(_bits(arg) for arg in expr.args) + 1
    return 1.0


def too_big(expr) -> bool:
    """Static guard: would evaluating this explode? Counts nodes, bounds numeric magnitudes."""
    nodes = 0
    for node in sympy.preorder_traversal(expr):
        nodes += 1
        if nodes > MAX_NODES:
            return True
        if (node.is_Pow or isinstance(node, sympy.factorial)) and not node.free_symbols and _bits(node) > MAX_BITS:
            return True
        if isinstance(node, (sympy.Sum, sympy.Product, sympy.Integral)):
            return True  # evaluating them is unbounded (a sum of n**n to 10**6 runs for minutes)
    return False


def _numeric(expr, digits: int = 30):
    """A finite complex value at `digits` significant digits, or None (nan, infinities, symbols)."""
    value = sympy.N(expr, digits)
    if not value.is_number or value.has(sympy.nan, sympy.zoo, sympy.oo, -sympy.oo):
        return None
    re_part, im_part = value.as_real_imag()
    return value if re_part.is_Number and im_part.is_Number else None


def _close(a, b, tol: float) -> bool:
    """Relative closeness of two sympy numbers (arbitrary exponents: no float overflow)."""
    scale = max(abs(a), abs(b))
    difference = abs(sympy.N(a - b, 30))
    return bool(difference == 0 or difference <= tol * scale)


def _values_close(a, b, tol: float) -> bool | None:
    """None when either side has no finite value. Exact values beyond 1e15 are compared with enough
    digits to see a difference of one, so that 10**20 + 1 never passes for 10**20."""
    left, right = _numeric(a), _numeric(b)
    if left is None or right is None:
        return None if left is None and right is None else False
    scale = max(abs(left), abs(right))
    if tol < REL_TOL and scale > 10**15:
        digits = int(sympy.log(scale, 10)) + 30
        if digits > MAX_DIGITS:
            return False
        left, right = _numeric(a, digits), _numeric(b, digits)
        return left is not None and right is not None and bool(abs(left - right) < 0.5)
    return _close(left, right, tol)


def canonical(expr):
    """`expr` with the index of each sum and product renamed by its depth, so that \\sum_i i^2 and
    \\sum_j j^2 are the same tree."""
    if not expr.has(sympy.Sum, sympy.Product):
        return expr

    def rename(node, depth):
        if not node.args:
            return node
        args = [rename(arg, depth + isinstance(node, (sympy.Sum, sympy.Product))) for arg in node.args]
        if isinstance(node, (sympy.Sum, sympy.Product)) and len(node.limits) == 1 and len(node.limits[0]) == 3:
            index = sympy.Symbol(f"_index{depth}")
            body, (variable, low, high) = args[0], args[1].args if isinstance(args[1], sympy.Tuple) else node.limits[0]
            return node.func(body.xreplace({variable: index}), (index, low, high))
        return node.func(*args)

    try:
        return rename(expr, 0)
    except (TypeError, ValueError, AttributeError):
        return expr


def sympy_equal(a, b, tol: float = EXACT_TOL) -> bool:
    """Two sympy expressions: structure, then values at fixed points (exact ones at 1e-20)."""
    if a == b or canonical(a) == canonical(b):
        return True
    places = OPTIONS.get().float_rounding
    if places is not None and not a.free_symbols and not b.free_symbols and not (too_big(a) or too_big(b)):
        rounded = [_numeric(side) for side in (a, b)]
        return None not in rounded and all(value.is_real for value in rounded) and \
            rounded[0].round(places) == rounded[1].round(places)
    if too_big(a) or too_big(b):
        return False
    if a.has(sympy.Float) or b.has(sympy.Float):
        tol = max(tol, REL_TOL)
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)  # sin^2 x + cos^2 x meets 1
    agreed = 0
    for shift, point in enumerate(_POINTS if symbols else _POINTS[:1]):
        values = {s: point + Rational(k * (shift + 1), 13) for k, s in enumerate(symbols)}
        close = _values_close(a.subs(values), b.subs(values), tol)
        if close is False:
            return False
        agreed += close is True
    return agreed >= (1 if not symbols else 3)


def _rounds_to(decimal: Answer, other: Answer) -> bool:
    """Is `decimal` the number `other` rounded or cut at its last written digit, written to at least
    REL_TOL relative precision? ("0.0833333333333333" for 1/12: yes; "0.0833": too few digits.)"""
    if not decimal.places or other.value == 0:
        return False
    ulp = Fraction(1, 10**decimal.places)
    return abs(decimal.value - other.value) < ulp and ulp <= REL_TOL * abs(other.value)


def _scalar_equal(gold: Answer, pred: Answer) -> bool:
    if gold.kind == "number" and pred.kind == "number" and OPTIONS.get().float_rounding is None:
        # Fractions: exact, "0.5" == "1/2"; a long decimal meets the rational it rounds
        return gold.value == pred.value or _rounds_to(pred, gold) or _rounds_to(gold, pred)
    tol = EXACT_TOL if gold.exact and pred.exact else REL_TOL
    return sympy_equal(to_sympy(gold), to_sympy(pred), tol)


def _assigned(answer: Answer) -> Answer | None:
    """`x = 2` (or `2 + 3 = 5`) as its right side; None for any other answer."""
    if answer.kind == "relation" and isinstance(answer.value, tuple):
        lhs, rhs = answer.value[1:]
        if lhs.kind == "expr" and lhs.value.is_Symbol:
            return rhs
        numeric = lambda side: side.kind == "number" or (side.kind == "expr" and not side.value.free_symbols)
        if numeric(lhs) and numeric(rhs):  # 65 + 62 = 127; never 7 = 11a + c
            return rhs
    return None


def _distinct(items: tuple) -> tuple:
    kept: list = []
    for item in items:
        if not any(equal(seen, item) for seen in kept):
            kept.append(item)
    return tuple(kept)


def _matched(golds: tuple, preds: tuple, ordered: bool) -> bool:
    if len(golds) != len(preds):
        return False
    if ordered:
        return all(equal(g, p) for g, p in zip(golds, preds))
    left = list(preds)
    for gold in golds:
        hit = next((i for i, pred in enumerate(left) if equal(gold, pred)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


_BOUNDS = {"<": (True, False), "<=": (False, False), ">": (True, True), ">=": (False, True)}


def _simple_set(relation):
    """The set of `x < 3`, `-2 <= x <= 7`, `x != 1` (one symbol against numbers) built directly:
    sympy's general `as_set` solves the inequality and costs about 0.1 s each."""
    if isinstance(relation, sympy.And):
        parts = [_simple_set(arg) for arg in relation.args]
        return None if None in parts else sympy.Intersection(*parts)
    if not isinstance(relation, sympy.core.relational.Relational) or relation.rel_op not in (*_BOUNDS, "!="):
        return None
    lhs, rhs = relation.lhs, relation.rhs
    if rhs.is_Symbol and not lhs.free_symbols:
        relation = relation.reversed
        lhs, rhs = relation.lhs, relation.rhs
    if not lhs.is_Symbol or rhs.free_symbols or not rhs.is_extended_real:
        return None
    if relation.rel_op == "!=":
        return sympy.Union(sympy.Interval.open(-sympy.oo, rhs), sympy.Interval.open(rhs, sympy.oo))
    open_end, lower = _BOUNDS[relation.rel_op]
    return sympy.Interval(rhs, sympy.oo, open_end, True) if lower else sympy.Interval(-sympy.oo, rhs, True, open_end)


def _as_set(relation):
    if isinstance(relation, tuple):
        relation = to_sympy(Answer("relation", relation))
    calls = relation.atoms(sympy.core.function.AppliedUndef)
    if len(calls) == 1:  # 0 < f(x) < 1 describes the values of f(x): a set in one unknown
        relation = relation.xreplace({calls.pop(): sympy.Symbol("_value")})
    if len(relation.free_symbols) != 1:
        return None
    simple = _simple_set(relation)
    if simple is not None:
        return simple
    try:
        return relation.as_set()
    except (NotImplementedError, TypeError, ValueError):  # sympy cannot solve it for its unknown
        return None


def _as_interval(answer: Answer):
    """The set an interval, a one-variable relation or a pair (a, b) (as the open interval) describes."""
    if answer.kind == "tuple":
        return sympy.Interval.open(*map(to_sympy, answer.value)) if len(answer.value) == 2 else None
    return _as_set(answer.value) if answer.kind == "relation" else answer.value


def _relations_equal(gold, pred) -> bool:
    if canonical(gold) == canonical(pred):  # also where values cannot be evaluated (sums, products)
        return True
    if isinstance(gold, sympy.Eq) and isinstance(pred, sympy.Eq):
        left, right = gold.lhs - gold.rhs, pred.lhs - pred.rhs
        return _proportional(left, right, positive=False)
    if isinstance(gold, sympy.core.relational._Inequality) and isinstance(pred, sympy.core.relational._Inequality):
        gold_lt = gold.reversed if gold.rel_op in (">", ">=") else gold
        pred_lt = pred.reversed if pred.rel_op in (">", ">=") else pred
        if gold_lt.rel_op != pred_lt.rel_op:
            return False
        return _proportional(gold_lt.rhs - gold_lt.lhs, pred_lt.rhs - pred_lt.lhs, positive=True)
    gold_set, pred_set = _as_set(gold), _as_set(pred)
    return gold_set is not None and gold.free_symbols == pred.free_symbols and gold_set == pred_set


def _proportional(a, b, positive: bool) -> bool:
    """a == c*b for one non-zero constant c (positive when `positive`), tested at the fixed points."""
    if too_big(a) or too_big(b) or a.free_symbols != b.free_symbols:
        return False
    symbols = sorted(a.free_symbols, key=str)
    ratios = []
    for shift, point in enumerate(_POINTS):
        values = {s: point + Rational(k * (shift + 1), 13) for k, s in enumerate(symbols)}
        left, right = _numeric(a.subs(values)), _numeric(b.subs(values))
        if left is None or right is None or right == 0:
            continue
        ratios.append(sympy.N(left / right, 30))
    if len(ratios) < 3 or ratios[0] == 0 or (positive and not (ratios[0].is_real and ratios[0] > 0)):
        return False
    return all(_close(r, ratios[0], 1e-12) for r in ratios)


def _set_equal(gold_set, pred_set) -> bool:
    if isinstance(gold_set, sympy.Interval) and isinstance(pred_set, sympy.Interval):
        return (gold_set.left_open, gold_set.right_open) == (pred_set.left_open, pred_set.right_open) and \
            all(sympy_equal(g, p) for g, p in zip(gold_set.args[:2], pred_set.args[:2]))
    return gold_set == pred_set


def equal(gold: Answer, pred: Answer) -> bool:
    kinds = {gold.kind, pred.kind}
    if kinds <= {"number", "expr"}:
        return _scalar_equal(gold, pred)
    for one, other in ((gold, pred), (pred, gold)):
        if one.kind == "relation" and other.kind not in ("relation", "interval", "tuple"):
            right = _assigned(one)
            return right is not None and equal(right, other) if one is gold else \
                right is not None and equal(other, right)
    if kinds <= {"set", "list", "tuple"}:
        ordered = "tuple" in kinds
        if "set" in kinds and "tuple" in kinds:
            if OPTIONS.get().strict:
                return False
            ordered = False
        solutions = kinds == {"list"} and all(item.kind == "tuple" for item in gold.value + pred.value)
        if "set" in kinds or solutions:  # {1, 2, 2} is {1, 2}; a list of tuples is a solution set
            return _matched(_distinct(gold.value), _distinct(pred.value), False)
        return _matched(gold.value, pred.value, ordered)
    for one, other in ((gold, pred), (pred, gold)):  # {3} against 3
        if one.kind in ("set", "list") and len(one.value) == 1 and other.kind in ("number", "expr"):
            return equal(one.value[0], other) if one is gold else equal(other, one.value[0])
    if gold.kind == "relation" and pred.kind == "relation":
        assigned_gold, assigned_pred = _assigned(gold), _assigned(pred)
        if assigned_gold is not None and assigned_pred is not None and gold.value[1] == pred.value[1]:
            return equal(assigned_gold, assigned_pred)
        return _relations_equal(to_sympy(gold), to_sympy(pred))
    if kinds <= {"relation", "interval", "tuple"} and kinds != {"tuple"}:
        if gold.kind != "relation" and pred.kind == "relation" and not OPTIONS.get().allow_set_relation_comp:
            return False
        sets = [_as_interval(answer) for answer in (gold, pred)]
        return None not in sets and _set_equal(*sets)
    if kinds == {"matrix"}:
        g, p = gold.value, pred.value
        return g.shape == p.shape and all(sympy_equal(x, y) for x, y in zip(g, p))
    if gold.kind == pred.kind and gold.kind in ("choice", "text"):
        return gold.value == pred.value
    return False


def check(gold: str, pred: str | None, options: Options = DEFAULT_OPTIONS) -> bool | None:
    """The whole check for normalised strings; None when the gold is not an answer."""
    from rewards.math_parse import parse

    gold_answer = _parse_gold(gold)
    if gold_answer is None:
        return None
    pred_answer = parse(pred) if pred else None
    if pred_answer is None:
        return False
    with compared_under(options):
        if not options.strict:
            pred_answer = _renamed(pred_answer, gold_answer)
        return equal(gold_answer, pred_answer)


def _renamed(pred: Answer, gold: Answer) -> Answer:
    """Non-strict mode: the prediction's free symbols take the gold's names, matched in sorted order."""
    if pred.kind != "expr" or gold.kind != "expr":
        return pred
    names = [sorted(answer.value.free_symbols, key=str) for answer in (pred, gold)]
    if len(names[0]) != len(names[1]) or names[0] == names[1]:
        return pred
    return dataclasses.replace(pred, value=pred.value.xreplace(dict(zip(*names))))


_GOLD_CACHE: dict[str, Answer | None] = {}


def _parse_gold(gold: str) -> Answer | None:
    """A GRPO group grades G completions against one gold: parse it once per worker."""
    from rewards.math_parse import parse

    if gold not in _GOLD_CACHE:
        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gold] = parse(gold)
    return _GOLD_CACHE[gold]
