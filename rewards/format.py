"""The R1 format reward: reasoning in <think>…</think>, then the answer in <answer>…</answer>."""

import re

from rewards.registry import register
from rewards.text import completion_text

# Tolerant on whitespace and newlines (open-r1#235: a strict `^<think>\n...` regex scored 0 forever);
# strict on order and on each tag appearing exactly once.
R1_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?think>|</?answer>).)*</answer>\s*",
                       re.DOTALL)


@register("format")
def format_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
    return [1.0 if R1_FORMAT.fullmatch(completion_text(c)) else 0.0 for c in completions]
