"""Golds reduced to their final answer when the data is loaded, by the dataset's own convention.

GRPO's `accuracy` reward compares a completion's final answer with the row's `solution`. Real math
datasets write their gold in their own way: GSM8K a worked solution ending in `#### 72`, MATH and
NuminaMath a worked solution with a `\\boxed{}`, OpenR1-Math and DAPO-Math an explicit answer column.
`data.answer_format` names the convention; the answer is found with the checker's own extraction
(rewards/math_extract.py), so data and reward read a gold the same way.

- auto (the default): per row, the `answer` column where the data has one and the row's is not
  empty, taken as a bare answer; else the `solution` column: a one-line gold is a bare answer
  (`$\\frac{1}{2}$`, `x \\in [-2, 7]`, "The answer is 5"); a worked solution is read where a
  completion states its answer (the last `\\boxed{}`, `<answer>`, GSM8K's `#### N`, "the answer
  is"), but never from its last line, which is no answer when none is marked (a proof).
- gsm8k: the `solution` must hold GSM8K's `#### N`; N is the answer.
- boxed: the `solution` must hold a `\\boxed{}`; the last one counts (boxes side by side, as in
  `$\\boxed{-2}$ and $\\boxed{3}$`, are one answer, a list).
- column: every row's `answer` column, a bare answer.
- raw: the `solution` as written, unchecked; the checker reads it at reward time.

Rows of coding tasks (a `format` column, data/coding.py) keep their reference program as it is.
A gold with no final answer, or one the checker cannot read (empty, unbalanced braces), is a
DataError naming its rows and column before any work starts: never a row that silently scores 0.

After reduction `solution` holds the final answer, which every reward and the evaluation read. When
`solution` held a worked solution on every row (several lines or a marked answer; beside an answer
column, any text), that text is kept as `worked_solution` and, where the data has no `reasoning`
column, becomes the reasoning cold-start SFT trains on (`<think>worked solution</think><answer>
answer</answer>`), GSM8K's `#### N` line and `<<48/2=24>>` calculator annotations left out.
"""

import re

from datasets import Dataset

from rewards.math_extract import extract_prediction, last_boxed, normalise, unwrap_gold
from rewards.math_parse import balanced

from .errors import row_ids, row_name, unusable

ANSWER_FORMATS = ("auto", "raw", "gsm8k", "boxed", "column")
# Where a worked solution states its answer: a completion's extractors less "last_line".
MARKED = ("boxed", "answer_tag", "answer_is")
GSM8K_MARK = "####"
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")  # GSM8K: "48/2 = <<48/2=24>>24 clips"


class _Irreducible(ValueError):
    """Why one row's gold has no final answer."""


def gold_columns(answer_format: str, mapping: dict) -> tuple[str, ...]:
    """The columns the gold is read from, which the data must have once mapped."""
    if answer_format == "column" or (answer_format == "auto" and "answer" in mapping):
        return ("answer",)
    return ("solution",)


def _found(text: str | None, why: str) -> str:
    if text is None or not text.strip():
        raise _Irreducible(why)
    return text


def _bare(text: str) -> str:
    # A line break in LaTeX is a space; left in, the checker would read the gold as a solution.
    return unwrap_gold(" ".join(text.split()))


def _auto(text: str) -> str:
    text = text.strip()
    if "\n" not in text:
        return unwrap_gold(text)
    return _found(extract_prediction(text, MARKED), "a worked solution that marks no final answer "
                  f"(no \\boxed{{}}, '{GSM8K_MARK} N', <answer> or 'the answer is')")


def _gsm8k(text: str) -> str:
    if GSM8K_MARK not in text:
        raise _Irreducible(f"no '{GSM8K_MARK} N' line")
    return _found(extract_prediction(text, ("answer_is",)), f"nothing after '{GSM8K_MARK}'")


def _boxed(text: str) -> str:
    return _found(extract_prediction(text, ("boxed",)), "no \\boxed{}")


_REDUCE = {"auto": _auto, "gsm8k": _gsm8k, "boxed": _boxed, "column": _bare}


def _reduce_gold(gold, convention: str) -> str:
    """One gold's final answer by a convention of _REDUCE ("column": a bare answer); _Irreducible if none."""
    text = _found("" if gold is None else str(gold), "empty")
    return _readable(_REDUCE[convention](text))


def _readable(answer: str) -> str:
    """The answer on one line, if the checker reads it as an answer (rewards/math.py: a gold whose
    normalised answer is empty or has unbalanced braces grades every completion None)."""
    answer = " ".join(answer.split())
    checked = normalise(unwrap_gold(answer))
    if not checked or not balanced(checked):
        raise _Irreducible(f"its answer {answer!r} is not one the checker can read (empty or unbalanced braces)")
    return answer


def _is_worked(text) -> bool:
    """A worked solution, not a bare answer: several lines, or an answer marked inside prose."""
    text = str(text or "").strip()
    return "\n" in text or GSM8K_MARK in text or last_boxed(text) is not None


def _reasoning_of(worked: str) -> str:
    """A worked solution as SFT reasoning: the answer goes in <answer>, so GSM8K's `#### N` line
    goes, and with it the calculator annotations no model should learn to write."""
    if GSM8K_MARK in worked:
        return _CALCULATOR.sub("", worked[:worked.rfind(GSM8K_MARK)]).rstrip()
    return worked.strip()


def _column(ours: str, mapping: dict) -> str:
    theirs = mapping.get(ours, ours)
    return f"column {ours!r}" + (f" (dataset column {theirs!r})" if theirs != ours else "")


def reduce_golds(ds: Dataset, answer_format: str, split: str, mapping: dict, invalid_rows: str = "error") -> Dataset:
    """`solution` reduced to each row's final answer (see the module's docstring)."""
    if answer_format == "raw":
        return ds
    n, columns = len(ds), ds.column_names
    has_answer, has_solution = "answer" in columns and answer_format in ("auto", "column"), "solution" in columns
    solutions = ds["solution"] if has_solution else [None] * n
    answers = ds["answer"] if has_answer else [None] * n
    # A coding task's `solution` is its reference program (data/coding.py), not a math gold.
    coding = ds["format"] if "format" in columns else [None] * n
    reduced, worked, bad, dropped = [], [], [], []
    for index, (solution, answer, row_id, fmt) in enumerate(zip(solutions, answers, row_ids(ds), coding)):
        if fmt:
            reduced.append(solution)
            worked.append(False)
            continue
        use_answer = has_answer and (answer_format == "column" or not has_solution or str(answer or "").strip() != "")
        ours, text = ("answer", answer) if use_answer else ("solution", solution)
        try:
            reduced.append(_reduce_gold(text, "column" if use_answer else answer_format))
        except _Irreducible as why:
            bad.append(f"{row_name(index, row_id)}, {_column(ours, mapping)}: {why}: …{str(text)[-80:]!r}")
            reduced.append(None)
            dropped.append(index)
        # Beside an answer column, `solution` is the dataset's worked solution, however short.
        worked.append(bool(str(solution or "").strip()) and (use_answer or _is_worked(solution)))
    unusable(split, f"have a gold that cannot be reduced to a final answer (data.answer_format={answer_format!r})",
             bad, n, invalid_rows)
    if dropped:
        kept = sorted(set(range(n)) - set(dropped))
        ds, solutions = ds.select(kept), [solutions[i] for i in kept]
        reduced, worked = [reduced[i] for i in kept], [worked[i] for i in kept]
    if has_solution and n > 0 and all(worked):
        ds = ds.add_column("worked_solution", [s.strip() for s in solutions])
        if "reasoning" not in ds.column_names:
            ds = ds.add_column("reasoning", [_reasoning_of(s) for s in solutions])
    if has_solution:
        ds = ds.remove_columns("solution")
    return ds.add_column("solution", reduced)
