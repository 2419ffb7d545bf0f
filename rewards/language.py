"""Language consistency (DeepSeek-R1 §2.3): the share of the reasoning's words written in the target
language, which R1 added to stop chain-of-thought from mixing languages."""

import re

from rewards.registry import register
from rewards.text import completion_text

# A word belongs to a language by its script; a Han character counts as one word.
SCRIPTS = {
    "en": re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?"),
    "zh": re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]"),
    "ru": re.compile(r"[\u0400-\u04ff]+"),
}
_WORD = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]|[^\W\d_\u4e00-\u9fff\u3400-\u4dbf]+")  # letters only: numbers and maths do not vote
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def reasoning(text: str) -> str:
    """The <think>…</think> part; the whole completion when it has no think block."""
    found = _THINK.search(text)
    return found.group(1) if found else text


def target_share(text: str, language: str) -> float | None:
    words = _WORD.findall(text)
    if not words:
        return None
    target = SCRIPTS[language]
    return sum(1 for word in words if target.fullmatch(word)) / len(words)


@register("language_consistency")
def language_consistency_reward(prompts, completions, completion_ids=None, *, language: str = "en",
                                **columns) -> list[float | None]:
    """Share of target-language words in the reasoning; None when the reasoning has no words."""
    if language not in SCRIPTS:
        raise ValueError(f"language_consistency: language = {language!r}; valid: {sorted(SCRIPTS)}")
    return [target_share(reasoning(completion_text(c)), language) for c in completions]
