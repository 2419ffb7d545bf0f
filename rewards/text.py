"""Shared helpers: completions arrive as strings or, for chat datasets, as message lists."""

import re


def completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion if message.get("role") == "assistant")


ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def extract_answer(text: str) -> str | None:
    """The last <answer>…</answer>, else the last \\boxed{…}; None when the completion gives none."""
    for pattern in (ANSWER_TAG, BOXED):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    return None
