"""One surface form per answer: LaTeX spelling, numbers as written, units, percent, relations,
equality chains, labels and ratios. Pure string work, run in the caller's process.

The rules that decide a value (see rewards/math.py's docstring for the policy as a whole):
- Percent: `N\\%` with N an integer meets N (the question's unit, as in "what percent…"); any
  other `X\\%` is X/100, so `\\frac{1}{2}\\%` is 1/200 and never meets `\\frac{1}{2}`; there is no
  factor-100 rule (`50\\%` does not meet `0.5`).
- An equality chain `x = 5+5+1 = 7 = 11` is its first and last sides, `x = 11`: the last side is
  the value the chain arrives at; the sides between are working and are not graded. An equation
  between two different integers (`4 = 5`) is false and states no answer. `a \\approx b`
  after a value is dropped (the exact value precedes it).
- A label is a name on the left of `=`: `f(x) = 1`, `|AB| = 1`, `V_1:V_2 = 11:21`, `(p, q) = (3, 2)`,
  `AB = 4`. A single label is dropped (the value is the answer); a single-letter variable (`x = 2`)
  stays an equation, which meets its right side in rewards/math_equiv.py. A list of labelled values
  (`a = 2, b = 3`; `p=5,q=2;p=7,q=2`) becomes a tuple per group, in written order, or sorted by
  label when both sides are labelled, so that `g(x)=-x, f(x)=x` meets `f(x)=x, g(x)=-x`; the same
  label repeated (`x = 1, x = 5`) is a list of solutions.
- A ratio `a:b` is the tuple (a, b): `11:21` meets only `11:21`, term by term.
"""

from __future__ import annotations

import re
from fractions import Fraction

from rewards.math_parse import parse_number, split_top

_UNITS = ("square units", "sq units", "units", "unit", "cm", "mm", "km", "m", "meters", "meter", "metres",
          "inches", "inch", "feet", "foot", "ft", "miles", "mile", "mph", "seconds", "second", "sec", "minutes",
          "minute", "min", "hours", "hour", "days", "day", "weeks", "years", "year", "dollars", "dollar",
          "cents", "cent", "degrees", "degree", "kg", "grams", "gram", "g", "pounds", "lbs", "liters", "l",
          "ml", "people", "students", "apples", "euros", "euro", "USD", "EUR")
_UNIT_NAMES = "|".join(sorted(map(re.escape, _UNITS), key=len, reverse=True))
_POWER = r"(?:\^\{?[23]\}?|[²³])?"
# A unit after a number: "5 cm", "25 m²", "1,000.99m²" (glued only when it carries a power or is a
# word, so that "5m" stays five times m while "5 m" is five metres).
_UNIT_TAIL = re.compile(rf"(?<=[\d}}.)])(?:\s+{_POWER}\s*(?:{_UNIT_NAMES}){_POWER}|\s*(?:[a-z]{{2,}}|m|cm|km|mm)[²³])\s*$")
_CURRENCY = re.compile(r"[€£¥₹]|\\euro\b|\\pounds\b|\bUSD\b|\bEUR\b|\bRs\.?")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textnormal|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|~|\\displaystyle|\\limits")
_THOUSANDS = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")  # never 0,111 (a decimal comma)
_SPACE_THOUSANDS = re.compile(r"-?[1-9]\d{0,2}(?: \d{3})+(?:\.\d+)?")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_PERCENT = re.compile(r"\s*(?:\\%|%|\bpercent(?:age)?\b|\bpct\b)\s*$")
_RELATIONS = ((">=", "\\ge "), ("<=", "\\le "), ("!=", "\\ne "), ("≥", "\\ge "), ("≤", "\\le "), ("≠", "\\ne "),
              ("\\geqslant", "\\ge "), ("\\leqslant", "\\le "), ("\\gt", ">"), ("\\lt", "<"), ("=<", "\\le "),
              ("=>", "\\ge "))
_ARRAY = re.compile(r"[\[(]?\s*\\begin\{array\}\{[lcr|]*\}(.*?)\\end\{array\}\s*[\])]?", re.DOTALL)
_JOIN_WORDS = re.compile(r"\s*,?\s*\b(?:and|or)\b\s*,?\s*")

_VARIABLE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?'*")
_NAME = re.compile(r"[A-Za-z]+(?:_\{?\w+\}?)?(?:\^\{?-1\}?)?'*(?:\([\w ,]*\))?|\|[A-Za-z]+\||\\frac\{[A-Za-z]+\}\{[A-Za-z]+\}|"
                   r"\((?:\s*[A-Za-z](?:_\{?\w+\}?)?\s*,)+\s*[A-Za-z](?:_\{?\w+\}?)?\s*\)")


def normalise(answer: str) -> str:
    """Drops `$`, `\\left`/`\\right`, spacing, `\\text{}` wrappers, units, currency, degrees and
    thousands separators; spells relations one way; applies the percent, chain and ratio rules."""
    s = answer.strip()
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right|bigg|Bigg|big|Big)(?![a-zA-Z])\.?", "", s)
    s = s.replace("\\{", "\x00").replace("\\}", "\x01")  # keep set braces apart from groups
    s = _DEGREES.sub("", s)
    s = re.sub(r"(\d)(?:\s*\{\s*,\s*\}\s*|,\\!|,\s*\\!\s*)(?=\d{3}(?!\d))", r"\1,", s)  # 32,\!349, 14{,}916, 14 {, }916
    s = re.sub(r"(\d)\\[,;: ](?=\d{3}\b)", r"\1", s)  # 4\,000
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])(?![a-zA-Z])", r"\\sqrt{\1}", s)  # \sqrt3
    s = _SPACING.sub(" ", s.replace("\\\\", "\x02")).replace("\x02", "\\\\")  # \\ is a matrix row
    for _ in range(3):  # nested \text{\textbf{…}}
        s = _TEXT_CMD.sub(lambda m: " " + m.group(1), s)
    for spelled, canonical in _RELATIONS:
        s = s.replace(spelled, canonical)
    s = " ".join(s.split()).strip().rstrip(".").strip()
    s = re.sub(r"^(?:[a-zA-Z]\s*\\in\s*)", "", s)  # x \in (1, 2]  ->  (1, 2]
    s = re.sub(r"^([A-Za-z](?:_\{?\w+\}?)?)\s*\\approx", r"\1 =", s)  # x \approx 11 names a value
    s = re.sub(r"(?<=\S)\s*\\approx.*$", "", s)  # 1/3 \approx 0.33: the exact value is the answer
    s = _ARRAY.sub(r"\\begin{pmatrix}\1\\end{pmatrix}", s)
    s = re.sub(r"\(([^(),;]*(?:;[^(),;]*)+)\)", lambda m: "(" + m.group(1).replace(";", ",") + ")", s)  # (0;-2;6)
    if s.startswith("{") and s.endswith("}") and _group(s):
        s = s[1:-1].strip()  # {1,3}: a TeX group, not a set (a set is \{1,3\})
    s = _CURRENCY.sub("", s).strip()
    s = _UNIT_TAIL.sub("", s).strip()
    percent = _PERCENT.search(s)
    if percent:
        s = _percent(s[:percent.start()].strip())
    s = _UNIT_TAIL.sub("", s).strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    elif _SPACE_THOUSANDS.fullmatch(s):
        s = s.replace(" ", "")
    if _JOIN_WORDS.search(s) and not re.search(r"[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+", " ", _JOIN_WORDS.sub(",", s))):
        s = _JOIN_WORDS.sub(", ", s).strip(", ")  # 19, 46, and 82;  (11,7) or (7,11)
    return s.replace("\x00", "\\{").replace("\x01", "\\}")


def _group(s: str) -> bool:
    """Does the brace opening s[0] close at s[-1]?"""
    level = 0
    for i, char in enumerate(s):
        level += char == "{"
        level -= char == "}"
        if level == 0:
            return i == len(s) - 1
    return False


def _percent(value: str) -> str:
    if re.fullmatch(r"[+-]?\d+", value):
        return value  # the integer rule: 28\% meets 28
    number = parse_number(value)
    if number is not None:
        exact = number.value / 100
        return str(exact) if isinstance(exact, Fraction) else value
    return f"\\frac{{{value}}}{{100}}"


def _chain(s: str) -> str:
    sides = split_top(s, "=")
    if len(sides) == 2 and all(re.fullmatch(r"-?\d+", side.strip()) for side in sides) and \
            int(sides[0]) != int(sides[1]):
        return ""  # `4 = 5` is false, not an answer of 5
    if len(sides) > 2 and all(sides) and not any(op in s for op in ("<", ">", "\\le", "\\ge")):
        return f"{sides[0]} = {sides[-1]}"
    return s


def _ratio(s: str) -> str:
    terms = split_top(s, ":")
    if len(terms) > 1 and all(terms) and "\\" not in s.replace("\\frac", "").replace("\\sqrt", ""):
        return "(" + ", ".join(terms) + ")"
    return s


def _label(item: str) -> tuple[str, str] | None:
    """(label, value) for `name = value` with a name on the left; None otherwise."""
    sides = split_top(item, "=")
    if len(sides) != 2 or not all(sides):
        return None
    name = sides[0].replace(" ", "")
    if _NAME.fullmatch(name) or all(_NAME.fullmatch(part) for part in name.split(":")):
        return re.sub(r"[{}]", "", name), sides[1]
    return None


def relabel(s: str) -> tuple[str, str | None]:
    """(the answer with its labels resolved in written order, the same sorted by label or None when
    it has no list of labels). See the module docstring for the rules."""
    raw = [split_top(group) for group in split_top(s, ";")]
    groups = [[_chain(item) for item in group] for group in raw]
    items = [item for group in groups for item in group]
    labelled = [[_label(item) for item in group] for group in groups]
    flat = [pair for group in labelled for pair in group]
    if len(items) == 1:
        pair = flat[0]
        if pair is None or _VARIABLE.fullmatch(pair[0]):
            return (_ratio(items[0]) if pair is None else items[0]), None
        return _ratio(pair[1]), None
    if any(pair is None for pair in flat):
        if flat[0] is not None and all(pair is None for pair in flat[1:]) and len(groups) == 1:
            return ", ".join([flat[0][1]] + items[1:]), None  # (x, y) = (5, 8), (8, 5)
        return ", ".join(items) if len(groups) == 1 and groups != raw else s, None
    if len({label for label, _ in flat}) == 1 and len(groups) == 1:
        return ", ".join(value for _, value in flat), None  # x = 1, x = 5: the solutions
    written = ", ".join("(" + ", ".join(value for _, value in group) + ")" for group in labelled)
    ordered = ", ".join("(" + ", ".join(value for _, value in sorted(group)) + ")" for group in labelled)
    return (written if len(groups) > 1 or len(items) > 1 else s), ordered
