"""N-gram repetition penalty (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning"; the
open-r1 form): `max_penalty` times the share of repeated word n-grams, 0 for a text without repeats."""

from rewards.registry import register
from rewards.text import completion_text


def repeated_share(text: str, ngram_size: int) -> float:
    words = text.lower().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = [tuple(words[i:i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
    return 1.0 - len(set(ngrams)) / len(ngrams)


@register("repetition")
def repetition_reward(prompts, completions, completion_ids=None, *, ngram_size: int = 3, max_penalty: float = -1.0,
                      **columns) -> list[float]:
    if ngram_size < 1:
        raise ValueError(f"repetition: ngram_size = {ngram_size!r} must be at least 1")
    if max_penalty > 0:
        raise ValueError(f"repetition: max_penalty = {max_penalty!r} must be <= 0 (it is a penalty)")
    return [max_penalty * repeated_share(completion_text(c), ngram_size) for c in completions]
