"""Exact-match answer reward: the stand-in for the sympy checker (rewards/math.py, issue 4).

Compares the extracted answer with the gold `solution` column after whitespace normalisation, and
as exact rationals when both sides are plain numbers or fractions ("0.5" matches "1/2").
"""

from fractions import Fraction

from rewards.registry import register
from rewards.text import completion_text, extract_answer


def _normalise(text: str) -> str:
    return "".join(text.split()).rstrip(".")


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(gold: str, pred: str) -> bool:
    gold, pred = _normalise(gold), _normalise(pred)
    if gold == pred:
        return True
    gold_number, pred_number = _as_number(gold), _as_number(pred)
    return gold_number is not None and gold_number == pred_number


@register("exact_match", columns=("solution",))
def exact_match_reward(prompts, completions, completion_ids=None, solution=None, **columns) -> list[float | None]:
    if solution is None:
        raise ValueError("exact_match needs the dataset column 'solution' (the gold answer)")
    rewards = []
    for completion, gold in zip(completions, solution):
        if gold is None or not str(gold).strip():
            rewards.append(None)  # no gold: the row is skipped, never scored 0 or 1
            continue
        pred = extract_answer(completion_text(completion))
        rewards.append(1.0 if pred is not None and answers_match(str(gold), pred) else 0.0)
    return rewards
