"""R1's readability filters for rejection sampling (DeepSeek-R1 §2.3.3): of the correct samples, R1
"filtered out chain-of-thought with mixed languages, long paragraphs, and code blocks", so that the
SFT data teaches reasoning a reader can follow.

Each filter is a small pure function that returns True when the sample must go; `apply_filters` runs
the ones a recipe switches on.
"""

from __future__ import annotations

import inspect
import re

from rewards.language import SCRIPTS, reasoning, target_share

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_CODE_FENCE = re.compile(r"^\s*```", re.MULTILINE)
# Lines only a program starts with; prose almost never begins a line with a lowercase `import x`.
_CODE_LINE = re.compile(r"^\s*(?:def\s+\w+\s*\(|import\s+\w|from\s+[\w.]+\s+import\s|print\()", re.MULTILINE)
DOMAINS = ("math", "code", "general")


def mixed_language(text: str, language: str = "en", min_share: float = 0.95) -> bool:
    """Fewer than `min_share` of the reasoning's words are in `language`. Reasoning without words
    (digits and symbols only) mixes nothing and stays."""
    if language not in SCRIPTS:
        raise ValueError(f"mixed_language: language={language!r}; valid: {', '.join(sorted(SCRIPTS))}")
    share = target_share(reasoning(text), language)
    return share is not None and share < min_share


def over_long(length_tokens: int, max_tokens: int) -> bool:
    return length_tokens > max_tokens


def long_paragraph(text: str, max_chars: int = 1000) -> bool:
    """A paragraph (blank-line separated) of the reasoning is longer than `max_chars` characters:
    a wall of text is what R1's readability pass removed. The paper gives no number; 1000 characters
    is about 150-200 English words."""
    return any(len(paragraph.strip()) > max_chars for paragraph in _PARAGRAPH_BREAK.split(reasoning(text)))


def code_in_math(text: str) -> bool:
    """The reasoning holds a fenced code block or a line only code starts with (def, import, print().
    Meant for maths answers; `apply_filters` runs it on domain "math" only."""
    thought = reasoning(text)
    return bool(_CODE_FENCE.search(thought) or _CODE_LINE.search(thought))


FILTERS = {
    "mixed_language": mixed_language,
    "over_long": over_long,
    "long_paragraph": long_paragraph,
    "code_in_math": code_in_math,
}
STEPS = (*FILTERS, "dedupe", "max_per_prompt")


def dedupe(samples: list[dict]) -> list[dict]:
    """The first of the samples of a prompt whose completions differ only in whitespace."""
    seen, kept = set(), []
    for sample in samples:
        key = (sample["id"], " ".join(sample["completion"].split()))
        if key not in seen:
            seen.add(key)
            kept.append(sample)
    return kept


def max_per_prompt(samples: list[dict], limit: int) -> list[dict]:
    """The first `limit` samples of each prompt: one easy prompt must not fill the SFT set."""
    counts, kept = {}, []
    for sample in samples:
        counts[sample["id"]] = counts.get(sample["id"], 0) + 1
        if counts[sample["id"]] <= limit:
            kept.append(sample)
    return kept


def apply_filters(samples: list[dict], config: dict) -> tuple[list[dict], dict[str, int]]:
    """(kept samples, how many each step removed).

    samples: dicts with "id", "completion", "length" (tokens), "correct" (bool) and optionally
    "domain" (math | code | general; "general" when absent). config: a step name -> false (off), true
    (on with its defaults) or a dict of the filter's options; "dedupe" true/false; "max_per_prompt"
    an integer or false. Order: incorrect samples, then the filters in FILTERS' order, then dedupe,
    then max_per_prompt; a sample is counted under the first step that removes it.
    """
    filters = _enabled_filters(config)
    kept = [sample for sample in samples if sample["correct"]]
    removed = {"incorrect": len(samples) - len(kept)}
    for name, options in filters.items():
        before = len(kept)
        kept = [sample for sample in kept if not _removes(name, sample, options)]
        removed[name] = before - len(kept)
    if config.get("dedupe"):
        before = len(kept)
        kept = dedupe(kept)
        removed["dedupe"] = before - len(kept)
    limit = config.get("max_per_prompt")
    if limit:
        before = len(kept)
        kept = max_per_prompt(kept, limit)
        removed["max_per_prompt"] = before - len(kept)
    return kept, removed


def _removes(name: str, sample: dict, options: dict) -> bool:
    if name == "over_long":
        return over_long(sample["length"], **options)
    if name == "code_in_math":
        domain = sample.get("domain", "general")
        if domain not in DOMAINS:
            raise ValueError(f"sample {sample['id']!r}: domain={domain!r}; valid: {', '.join(DOMAINS)}")
        return domain == "math" and code_in_math(sample["completion"])
    return FILTERS[name](sample["completion"], **options)


def _enabled_filters(config: dict) -> dict[str, dict]:
    """The switched-on filters with their options, checked before any sample is looked at."""
    unknown = sorted(set(config) - set(STEPS))
    if unknown:
        raise ValueError(f"unknown filter(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(STEPS)}")
    limit = config.get("max_per_prompt")
    off = limit is None or limit is False
    if not off and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_per_prompt={limit!r}; it must be an integer >= 1 or false")
    if config.get("dedupe") is not None and not isinstance(config["dedupe"], bool):
        raise ValueError(f"dedupe={config['dedupe']!r}; it must be true or false")
    enabled = {}
    for name, fn in FILTERS.items():
        value = config.get(name)
        if value is None or value is False:
            continue
        options = {} if value is True else value
        if not isinstance(options, dict):
            raise ValueError(f"{name}={value!r}; it must be true, false or a dict of options")
        try:
            inspect.signature(fn).bind(None, **options)  # the sample's text or length comes first
        except TypeError as error:
            valid = list(inspect.signature(fn).parameters)[1:]
            raise ValueError(f"{name}: options {options} do not fit ({error}); "
                             f"its options: {', '.join(valid)}") from None
        enabled[name] = options
    return enabled
