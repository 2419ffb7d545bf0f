"""Data for the R1 pipeline: template, tokenizer, synthetic problems, loading."""

from .chat import CHAT_KINDS, REFUSAL, build_chat, build_preferences
from .coding import CODING_KINDS, build_coding
from .loading import DataError, build_datasets
from .synthetic import SYNTHETIC_KINDS, build_synthetic
from .template import (PROMPT_FORMATS, R1_SYSTEM_PROMPT, completion_for, prompt_for, render_completion, render_prompt,
                       rendered)
from .tokenizer import build_tokenizer

__all__ = [
    "R1_SYSTEM_PROMPT",
    "render_prompt",
    "render_completion",
    "PROMPT_FORMATS",
    "prompt_for",
    "completion_for",
    "rendered",
    "build_tokenizer",
    "build_synthetic",
    "build_datasets",
    "DataError",
    "SYNTHETIC_KINDS",
    "build_coding",
    "CODING_KINDS",
    "build_chat",
    "build_preferences",
    "CHAT_KINDS",
    "REFUSAL",
]
