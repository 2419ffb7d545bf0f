"""DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): no penalty up to `max_length - cache`
tokens, then a penalty growing linearly to -1 at `max_length`, and -1 beyond it."""

from rewards.registry import register


def soft_overlong_penalty(length: int, max_length: int, cache: int) -> float:
    expected = max_length - cache
    if length <= expected:
        return 0.0
    if length <= max_length:
        return (expected - length) / cache
    return -1.0


@register("soft_overlong")
def soft_overlong_reward(prompts, completions, completion_ids=None, *, max_length: int = 20480, cache: int = 4096,
                         **columns) -> list[float]:
    """Lengths in tokens, from `completion_ids` (defaults: DAPO's 20480 and 4096)."""
    if not 0 < cache <= max_length:
        raise ValueError(f"soft_overlong: cache = {cache!r} must be in (0, max_length = {max_length!r}]")
    if completion_ids is None:
        raise ValueError("soft_overlong needs completion_ids (token lengths); the trainer passes them")
    return [soft_overlong_penalty(len(ids), max_length, cache) for ids in completion_ids]
