"""The math checker (DESIGN.md contract 2) and the `accuracy` reward.

    from rewards.math import verify, verify_many
    verify("\\frac{7}{12}", "<think>…</think><answer>7/12</answer>")       # True
    verify_many([(gold, completion), ...], timeout=5.0)                      # [True, False, None, ...]

A check has three stages:
1. In the caller: the gold's answer is found (rewards/math_extract.py): a bare answer is unwrapped
   (`$…$`, `\\boxed{}`) and taken whole, never searched for a number; a gold written as a worked
   solution is read the way a completion is. The prediction's final answer is extracted the same
   way; both are normalised (rewards/math_normal.py). Identical answers are equal; plain numbers,
   choice letters and text are decided here, exactly (most GSM8K/MATH/AIME golds).
2. Everything else goes to the worker pool (rewards/math_pool.py): parsing to sympy and comparing
   (rewards/math_parse.py, rewards/math_equiv.py), each check under a hard wall-clock timeout.
3. A check that overruns its timeout is False and counted (`stats()`); the worker is replaced.
`None` means the gold is not an answer (empty, malformed LaTeX, over the parser's guards): GRPO
skips the row instead of rewarding or punishing it.

Where an answer could be read more than one way, the rule (each tested in tests/test_math_classes.py):
- Where the answer is: after the last `</think>`, cut at a chat special token (`<|im_start|>`…);
  then the last `\\boxed{}`; else the `<answer>` tag; else the text after the last "answer is",
  "Final Answer: The final answer is … I hope it is correct.", "Answer:", "Answer $…$" or `####`;
  else the last line. Within that segment: its box, else its math (`$…$`) unless a sentence after
  the math states a number ("Dividing, $60/5$ gives 12."), else, in prose, its last number ("The
  final answer is 12,000,023.", "so the total is 42", "2,74 €" as a decimal comma), unless the
  sentence hedges with "or". Minerva's "I hope it is correct." ends the answer even mid-line. A
  completion that opens `<think>` or `<answer>` and never closes it (cut at the length limit) has
  no answer.
- A rule drawn with one symbol between boxes (`\\boxed{4} ++++ \\boxed{9}`) divides the parts of one
  answer. A list of tuples is a solution set: a repeated tuple counts once.
- Several boxes (or `$…$` segments) separated only by commas, "and", "or", `\\quad` form one answer,
  a list: `\\boxed{1}, \\boxed{2}, \\boxed{3}` is {1, 2, 3}. Boxes with other words between them are
  revisions: the last one is the answer. A list never meets a single value, so hedging with
  `\\boxed{3} or \\boxed{4}` scores against both values and matches neither 3 nor 4.
- An equality chain is graded on its last side: `x = 5+5+1 = 7 = 11` is `x = 11` (right for 11).
  A number on the left of `=` meets the right side only when that is a number too (`65 + 62 = 127`
  meets 127; `7 = 11a + c` is an equation).
- A label on the left of `=` is not part of the answer (`f(x) = 1` meets 1); a single-letter
  variable makes an equation, which meets its right side (`x = 2` meets 2, but not `y = 2`).
- A relation meets the interval or set it describes, in both directions (`x \\in [-2, 7]` meets
  `-2 \\le x \\le 7`; math-verify accepts this only when the relation is the gold's).
- `options` (rewards.math_equiv.Options) are math-verify's switches under its names
  (`float_rounding`, `strict`, `allow_set_relation_comp`), for running its suite the way its tests
  call it; the defaults are the rules above.
- Percent: `28\\%` meets 28 (an integer) and `28 percent`; `\\frac{1}{2}\\%` is 1/200; `50\\%` never
  meets 0.5. Decimal commas: `1,22` meets `1.22` only when the other side is that decimal.
"""

from __future__ import annotations

import functools
import re

from rewards.math_equiv import DEFAULT_OPTIONS, Options, compared_under, equal
from rewards.math_extract import EXTRACTORS, MAX_ANSWER_CHARS, extract_prediction, unwrap_gold
from rewards.math_normal import normalise, relabel
from rewards.math_parse import balanced, parse_cheap
from rewards.math_pool import get_pool
from rewards.registry import register
from rewards.text import completion_text

_CHEAP_KINDS = {"number", "choice", "text"}
_DECIMAL_COMMA = re.compile(r"-?\d+,\d+")


def _decimal_comma(text: str, other: str) -> str:
    """`1000,99` (a decimal comma) is 1000.99 when the other side is that decimal, written with a point."""
    if _DECIMAL_COMMA.fullmatch(text) and re.fullmatch(r"-?\d+\.\d+", other) and text.replace(",", ".") == other:
        return other
    return text


@functools.lru_cache(maxsize=4096)
def _gold_answer(gold: str) -> str:
    """A GRPO group grades G completions against one gold: its answer is found once."""
    return normalise(unwrap_gold(gold))


def _prepare(gold, pred, extractors) -> tuple[str | None, str | None]:
    """(normalised gold or None, normalised predicted answer or None)."""
    gold_text = _gold_answer(str(gold)) if gold is not None else ""
    if not gold_text or not balanced(gold_text):
        return None, None
    answer = extract_prediction(str(pred), extractors) if pred is not None else None
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return relabel(gold_text)[0], None
    pred_text = normalise(answer)
    (gold_written, gold_sorted), (pred_written, pred_sorted) = relabel(gold_text), relabel(pred_text)
    if gold_sorted is not None and pred_sorted is not None:  # both name their values: match by name
        gold_written, pred_written = gold_sorted, pred_sorted
    return _decimal_comma(gold_written, pred_written), _decimal_comma(pred_written, gold_written)


def verify_many(pairs, timeout: float = 5.0, *, extractors: tuple[str, ...] = EXTRACTORS,
                options: Options = DEFAULT_OPTIONS) -> list[bool | None]:
    """Check (gold, pred) pairs; the ones that need sympy go to the worker pool in one round trip.
    `options` (math_equiv.Options) are math-verify's comparison switches; the defaults are ours."""
    if not timeout > 0:
        raise ValueError(f"timeout = {timeout!r} must be a positive number of seconds")
    if not isinstance(options, Options):
        raise TypeError(f"options must be rewards.math_equiv.Options, not {type(options).__name__}")
    results: list[bool | None] = []
    pooled: list[tuple[int, str, str | None]] = []
    for gold, pred in pairs:
        gold_text, pred_text = _prepare(gold, pred, extractors)
        if gold_text is None:
            results.append(None)
            continue
        if gold_text == pred_text:
            results.append(True)
            continue
        gold_cheap = parse_cheap(gold_text)
        pred_cheap = parse_cheap(pred_text) if pred_text else None
        if gold_cheap is not None and gold_cheap.kind in _CHEAP_KINDS and \
                (pred_text is None or (pred_cheap is not None and pred_cheap.kind in _CHEAP_KINDS)):
            with compared_under(options):
                results.append(pred_cheap is not None and equal(gold_cheap, pred_cheap))
            continue
        results.append(False)
        pooled.append((len(results) - 1, gold_text, pred_text))
    if pooled:
        # A GRPO group often repeats one answer: each distinct (gold, answer) is checked once.
        distinct = list(dict.fromkeys((gold, pred) for _, gold, pred in pooled))
        tasks = distinct if options == DEFAULT_OPTIONS else [(gold, pred, options) for gold, pred in distinct]
        verdicts = dict(zip(distinct, (result for result, _overran in get_pool().map(tasks, timeout))))
        for index, gold, pred in pooled:
            results[index] = verdicts[(gold, pred)]
    return results


def verify(gold: str, pred: str, timeout: float = 5.0, *, extractors: tuple[str, ...] = EXTRACTORS,
           options: Options = DEFAULT_OPTIONS) -> bool | None:
    """Is `pred` (a whole completion or a bare answer) equivalent to `gold`? None: the gold is no answer."""
    return verify_many([(gold, pred)], timeout, extractors=extractors, options=options)[0]


def stats() -> dict[str, int]:
    """Checks sent to the pool, how many overran their timeout, and how many workers were killed."""
    pool = get_pool()
    return {"checks": pool.checks, "overruns": pool.overruns, "kills": pool.kills}


@register("accuracy", columns=("solution",))
def accuracy_reward(prompts, completions, completion_ids=None, *, gold_column: str = "solution",
                    timeout: float = 5.0, extractors: tuple[str, ...] = EXTRACTORS, **columns) -> list[float | None]:
    """1.0 when the completion's final answer equals the gold, 0.0 when not, None when the gold
    cannot be parsed (GRPO then skips the row). One pool round trip for the whole batch."""
    golds = columns.get(gold_column)
    if golds is None:
        raise ValueError(f"accuracy needs the dataset column {gold_column!r} (the gold answer); "
                         f"columns given: {sorted(columns)}")
    verdicts = verify_many([(gold, completion_text(c)) for gold, c in zip(golds, completions)], timeout,
                           extractors=tuple(extractors))
    return [None if v is None else float(v) for v in verdicts]
