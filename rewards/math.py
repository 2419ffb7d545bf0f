"""The math checker (DESIGN.md contract 2) and the `accuracy` reward.

    from rewards.math import verify, verify_many
    verify("\\frac{7}{12}", "<think>…</think><answer>7/12</answer>")       # True
    verify_many([(gold, completion), ...], timeout=5.0)                      # [True, False, None, ...]

A check has three stages:
1. In the caller: the gold is unwrapped (`$…$`, `\\boxed{}`) and taken whole, never searched for a
   number; the prediction's final answer is extracted (rewards/math_extract.py); both are normalised.
   Plain numbers, choice letters and text are decided here, exactly (most GSM8K/MATH/AIME golds).
2. Everything else goes to the worker pool (rewards/math_pool.py): parsing to sympy and comparing
   (rewards/math_parse.py, rewards/math_equiv.py), each check under a hard wall-clock timeout.
3. A check that overruns its timeout is False and counted (`stats()`); the worker is replaced.
`None` means the gold is not an answer (empty, malformed LaTeX, over the parser's guards): GRPO
skips the row instead of rewarding or punishing it.
"""

from __future__ import annotations

from rewards.math_equiv import equal
from rewards.math_extract import EXTRACTORS, MAX_ANSWER_CHARS, extract_prediction, normalise, unwrap_gold
from rewards.math_parse import balanced, parse_cheap
from rewards.math_pool import get_pool
from rewards.registry import register
from rewards.text import completion_text

_CHEAP_KINDS = {"number", "choice", "text"}


def _prepare(gold, pred, extractors) -> tuple[str | None, str | None]:
    """(normalised gold or None, normalised predicted answer or None)."""
    gold_text = normalise(unwrap_gold(str(gold))) if gold is not None else ""
    if not gold_text or not balanced(gold_text):
        return None, None
    answer = extract_prediction(str(pred), extractors) if pred is not None else None
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return gold_text, None
    return gold_text, normalise(answer)


def verify_many(pairs, timeout: float = 5.0, *, extractors: tuple[str, ...] = EXTRACTORS) -> list[bool | None]:
    """Check (gold, pred) pairs; the ones that need sympy go to the worker pool in one round trip."""
    if not timeout > 0:
        raise ValueError(f"timeout = {timeout!r} must be a positive number of seconds")
    results: list[bool | None] = []
    pooled: list[tuple[int, str, str | None]] = []
    for gold, pred in pairs:
        gold_text, pred_text = _prepare(gold, pred, extractors)
        if gold_text is None:
            results.append(None)
            continue
        gold_cheap = parse_cheap(gold_text)
        pred_cheap = parse_cheap(pred_text) if pred_text else None
        if gold_cheap is not None and gold_cheap.kind in _CHEAP_KINDS and \
                (pred_text is None or (pred_cheap is not None and pred_cheap.kind in _CHEAP_KINDS)):
            results.append(pred_cheap is not None and equal(gold_cheap, pred_cheap))
            continue
        results.append(False)
        pooled.append((len(results) - 1, gold_text, pred_text))
    if pooled:
        # A GRPO group often repeats one answer: each distinct (gold, answer) is checked once.
        distinct = list(dict.fromkeys((gold, pred) for _, gold, pred in pooled))
        verdicts = dict(zip(distinct, (result for result, _overran in get_pool().map(distinct, timeout))))
        for index, gold, pred in pooled:
            results[index] = verdicts[(gold, pred)]
    return results


def verify(gold: str, pred: str, timeout: float = 5.0, *, extractors: tuple[str, ...] = EXTRACTORS) -> bool | None:
    """Is `pred` (a whole completion or a bare answer) equivalent to `gold`? None: the gold is no answer."""
    return verify_many([(gold, pred)], timeout, extractors=extractors)[0]


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
