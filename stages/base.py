"""Stage 0, pretraining: the base model the R1 recipe starts from. R1 post-trains DeepSeek-V3-Base; the
embedded default has no pretrained model, so this stage makes one: the preset, from random weights,
trained as a plain language model (loss on every token, sequences packed end to end) on a synthetic
corpus of arithmetic text that never uses R1's template (data/corpus.py). Stage 1 then teaches the
template on top of it, stage 3 retrains it, and GRPO started from it is R1-Zero.

A recipe for a pretrained model has no `base` section: `model.name_or_path` is its base."""

import dataclasses
import itertools

from datasets import Dataset

from data import build_tokenizer
from data.corpus import pretraining_corpus
from r1pipeline.config import INIT_FROM_HELP
from r1pipeline.pipeline import Stage, log
from r1pipeline.schema import defaults, key
from stages import sft
from stages.common import load_policy, training_texts

_POSITIVE = dict(check=lambda n: n >= 1, what="a positive integer")


@dataclasses.dataclass
class Options:
    """The stage's own keys; every other key of the `base` section is an SFTConfig field (with
    `packing: true` and `packing_strategy: wrapped` by default: pretraining's concatenated text)."""

    init_from: str = key("model", INIT_FROM_HELP + " (default: the preset's random weights)")
    documents: int = key(4000, "documents in the synthetic corpus (data/corpus.py)", **_POSITIVE)
    problems_per_document: int = key(4, "training problems (or counting lines) per document", **_POSITIVE)


def build_dataset(stage: Stage) -> Dataset:
    options = {**defaults(Options), **stage.section}
    texts = pretraining_corpus(stage.datasets["train"], options["documents"], options["problems_per_document"],
                               (stage.recipe.get("data") or {}).get("seed", 0))
    return Dataset.from_dict({"text": texts})


def run(stage: Stage) -> dict:
    dataset = build_dataset(stage)
    log(f"base: pretraining on {len(dataset)} documents of synthetic arithmetic text")
    tokenizer = None
    if stage.input_path() is None:  # the tokenizer knows the corpus and the later stages' template alike
        tokenizer = build_tokenizer(itertools.chain(training_texts(stage), dataset["text"]))
    model, tokenizer = load_policy(stage, tokenizer)
    return sft.train(stage, dataset, model, tokenizer, packing=True, packing_strategy="wrapped")
