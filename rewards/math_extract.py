"""Finding the final answer in a completion, and normalising an answer's surface form.

Runs in the caller's process, so everything here is linear-time string work (no backtracking
regexes over the whole completion); the sympy work happens in the worker pool (rewards/math_pool.py).
"""

from __future__ import annotations

import re

# Where a prediction's answer may be, tried in this order; the first that finds one wins.
EXTRACTORS = ("boxed", "answer_tag", "answer_is", "last_line")
MAX_ANSWER_CHARS = 400
MAX_BOX_TRIES = 4  # a longer "answer" is not an answer; it is compared as text only

_THINK_END = "</think>"
_ANSWER_IS = re.compile(r"(?:(?:final answer|the answer|answer)\s*(?:is|:)\s*:?|####)\s*([^\n]*)", re.IGNORECASE)


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the {...} group opening at text[start], and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        char = text[i]
        if char == "{" and text[i - 1:i] != "\\":
            depth += 1
        elif char == "}" and text[i - 1:i] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """The last \\boxed{…} or \\fbox{…}. One box only: a completion that revises its answer is graded
    on the final box, never on the set of all its boxes (MV's nearby-box joining, issue #57)."""
    best = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    for _ in range(MAX_BOX_TRIES):  # unclosed boxes: a bounded number of tries keeps this linear
        if best == -1:
            return None
        start = best + (6 if text.startswith("\\boxed", best) else 5)
        rest = text[start:]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            group = _braced(text, start + len(rest) - len(stripped))
            if group is not None:
                return group[0]
        elif text.startswith("\\boxed ", best):  # \boxed 5
            return stripped.split("$")[0].split()[0] if stripped else None
        best = max(text.rfind("\\boxed", 0, best), text.rfind("\\fbox", 0, best))
    return None


def _answer_tag(text: str) -> str | None:
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end != -1 else -1
    return text[start + len("<answer>"):end] if start != -1 else None


def _answer_is(text: str) -> str | None:
    found = None
    for found in _ANSWER_IS.finditer(text[-2000:]):
        pass
    return found.group(1) if found else None


def _last_line(text: str) -> str | None:
    lines = [line for line in text[-2000:].splitlines() if line.strip()]
    return lines[-1] if lines else None


_EXTRACT = {"boxed": last_boxed, "answer_tag": _answer_tag, "answer_is": _answer_is, "last_line": _last_line}


def extract_prediction(completion: str, extractors: tuple[str, ...] = EXTRACTORS) -> str | None:
    """The final answer of a completion (a bare answer is its own final line), read after the last
    </think> when the completion has one, so that guesses inside the reasoning are never graded."""
    unknown = [name for name in extractors if name not in _EXTRACT]
    if unknown:
        raise ValueError(f"unknown answer extractor(s) {unknown}; valid: {list(_EXTRACT)}")
    end = completion.rfind(_THINK_END)
    text = completion[end + len(_THINK_END):] if end != -1 else completion
    for name in extractors:
        answer = _EXTRACT[name](text)
        if answer is not None and answer.strip():
            inner = last_boxed(answer) if name != "boxed" else None  # <answer>so \boxed{5}</answer>
            return (inner if inner is not None else answer).strip()
    return None


def unwrap_gold(gold: str) -> str:
    """A gold is always taken as the answer: `$…$` and `\\boxed{…}` are unwrapped, nothing is searched."""
    gold = gold.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(gold) > len(left) + len(right) and gold.startswith(left) and gold.endswith(right):
            gold = gold[len(left):-len(right)].strip()
    if gold.startswith(("\\boxed", "\\fbox")):
        inner = last_boxed(gold)
        if inner is not None and gold.endswith("}"):
            gold = inner
    return gold


_UNITS = ("square units", "sq units", "units", "unit", "cm", "mm", "km", "m", "meters", "meter", "metres",
          "inches", "inch", "feet", "foot", "ft", "miles", "mile", "mph", "seconds", "second", "sec", "minutes",
          "minute", "min", "hours", "hour", "days", "day", "weeks", "years", "year", "dollars", "dollar",
          "cents", "cent", "degrees", "degree", "kg", "grams", "gram", "g", "pounds", "lbs", "liters", "l",
          "ml", "people", "students", "apples")
_UNIT_TAIL = re.compile(r"(?<=[\d}.)])\s+(?:\^\{?[23]\}?)?\s*(?:" + "|".join(sorted(_UNITS, key=len, reverse=True))
                        + r")(?:\^\{?[23]\}?)?\s*$")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|~|\\displaystyle|\\limits")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")


def normalise(answer: str) -> str:
    """One surface form per answer: drops `$`, `\\left`/`\\right`, spacing, `\\text{}` wrappers, units,
    degrees, percent signs and thousands separators; `\\dfrac`/`\\tfrac` become `\\frac`.
    A percent sign is dropped, not divided out: "50\\%" equals "50", not "0.5" (no factor-100 leniency)."""
    s = answer.strip()
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right|bigg|Bigg|big|Big)(?![a-zA-Z])\.?", "", s)
    s = s.replace("\\{", "\x00").replace("\\}", "\x01")  # keep set braces apart from groups
    s = _DEGREES.sub("", s)
    s = re.sub(r"(\d)\\[,;: ](?=\d{3}\b)", r"\1", s)  # 4\,000
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])(?![a-zA-Z])", r"\\sqrt{\1}", s)  # \sqrt3
    s = _SPACING.sub(" ", s)
    for _ in range(3):  # nested \text{\textbf{…}}
        s = _TEXT_CMD.sub(lambda m: " " + m.group(1), s)
    s = s.replace("{,}", "")
    s = " ".join(s.split()).strip().rstrip(".").strip()
    s = re.sub(r"^(?:[a-zA-Z]\s*\\in\s*)", "", s)  # x \in (1, 2]  ->  (1, 2]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = _UNIT_TAIL.sub("", s).strip()
    return s.replace("\x00", "\\{").replace("\x01", "\\}")
