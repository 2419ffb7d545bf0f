"""Stage 4, alignment RL for all scenarios (DeepSeek-R1 §2.3.4): GRPO over a mixture of reasoning
prompts, scored by rule rewards, and general prompts, scored by reward models (helpfulness on the
answer after </think>, harmlessness on the whole response). Every row carries a `domain` column;
a reward that does not apply to a row returns None and TRL averages each reward over the rows it
applies to.

A reward model is any sequence-classification checkpoint (`align.reward_model.path`). Without one,
the stage trains a tiny one with TRL's RewardTrainer on synthetic preference pairs (data/chat.py)
into runs/<run>/align/reward_model/, as the embedded default does.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from accelerate import PartialState
from datasets import concatenate_datasets

from data import build_tokenizer
from r1pipeline.config import INIT_FROM_HELP, REWARDS_HELP
from r1pipeline.pipeline import Stage, log
from r1pipeline.schema import defaults, key
from stages import grpo
from stages.common import prompt_of, system_prompt
from stages.rollouts import RolloutKeys

REWARD_MODEL_REWARDS = ("helpfulness", "harmlessness")
DEFAULT_GENERAL_RATIO = 0.3
RM_VOCAB_SIZE = 1024
_POSITIVE = dict(check=lambda value: value > 0, what="a positive number")


@dataclasses.dataclass
class RewardModel:
    """`align.reward_model`: a trained reward model's path, or how to train one on synthetic pairs."""

    path: str | None = key(None, "a sequence-classification checkpoint (skips training)",
                           check=lambda path: (Path(path) / "config.json").is_file(),
                           what="a checkpoint directory (with config.json)")
    num_pairs: int = key(2000, "synthetic preference pairs", **_POSITIVE)
    max_steps: int = key(200, "training steps", **_POSITIVE)
    learning_rate: float = key(1e-3, "learning rate", **_POSITIVE)
    hidden_size: int = key(64, "width of the reward model", **_POSITIVE)
    num_layers: int = key(2, "layers of the reward model", **_POSITIVE)
    seed: int = key(0, "seed of the pairs and the initialisation")


@dataclasses.dataclass
class Options(RolloutKeys):
    """The stage's own keys; every other key of the `align` section is a GRPOConfig field."""

    init_from: str = key("rejection", INIT_FROM_HELP)
    rewards: list | None = key(None, REWARDS_HELP + "; helpfulness/harmlessness without args.path use the stage's "
                                                    "reward model")
    general_ratio: float = key(DEFAULT_GENERAL_RATIO, "share of general (chat) prompts in the RL mixture",
                               check=lambda r: 0 <= r < 1, what="a number in [0, 1)")
    vllm_sync: dict | None = key(None, "with use_vllm (colocate): verify, timeout", schema=grpo.VLLMSync)
    reward_model: dict | None = key(None, "path, or training settings (num_pairs, max_steps, learning_rate, "
                                          "hidden_size, num_layers, seed)", schema=RewardModel)


TRAINING_DEFAULTS = {name: value for name, value in defaults(RewardModel).items() if name != "path"}


def reward_model_path(settings: dict, stage_dir: Path) -> str:
    return settings.get("path") or str(stage_dir / "reward_model")


def with_reward_model_paths(entries, settings: dict, stage_dir: Path):
    """The recipe's rewards, with the stage's reward model bound to reward-model rewards that name
    none (`args.path`)."""
    if not isinstance(entries, list):
        return entries
    bound = []
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") in REWARD_MODEL_REWARDS and \
                "path" not in (entry.get("args") or {}):
            entry = {**entry, "args": {**(entry.get("args") or {}),
                                       "path": reward_model_path(settings, stage_dir)}}
        bound.append(entry)
    return bound


def build_dataset(stage: Stage):
    """Reasoning rows from the training data and general chat rows, mixed with each kind spread evenly
    (`spread_evenly`)."""
    from data.chat import build_chat

    train = stage.datasets["train"]
    # Rewards read text columns; a real dataset's other columns (OpenR1's lists of generations and
    # verdicts, say) have no value for a general row, so they stay out of the mixture.
    text = [name for name, feature in train.features.items() if getattr(feature, "dtype", None) in ("string", "large_string")]
    reasoning = train.select_columns(text).map(lambda row: {"domain": "code" if row.get("format") else "math"})
    ratio = float(stage.section.get("general_ratio", DEFAULT_GENERAL_RATIO))
    num_general = round(len(reasoning) * ratio / (1 - ratio))
    parts = [reasoning]
    if num_general:
        chat = build_chat(num_general, seed=(stage.recipe.get("data") or {}).get("seed", 0))
        # Same columns on both sides; a general row has no gold, so rule rewards give it None.
        missing = {c: [""] * len(chat) for c in reasoning.column_names if c not in chat.column_names}
        for name, values in missing.items():
            chat = chat.add_column(name, values)
        parts.append(chat.select_columns(reasoning.column_names).cast(reasoning.features))
    mixture = concatenate_datasets(parts)
    strata = {}
    for index, (domain, kind) in enumerate(zip(mixture["domain"], mixture["kind"] if "kind" in mixture.column_names
                                               else [""] * len(mixture))):
        strata.setdefault((domain, kind), []).append(index)
    mixture = mixture.select(spread_evenly(list(strata.values()), seed=stage.trl_fields.get("seed", 42)))
    return mixture.map(lambda row: {"prompt": prompt_of(stage, row["prompt"])})


def spread_evenly(groups: list[list[int]], seed: int) -> list[int]:
    """Every index of `groups` in one order (trained in that order: TRL's shuffling is off for this
    stage) in which each group is spread evenly: a group's n members, in a shuffled order, land one
    n-th of the whole apart from a random start. Any stretch of steps then holds each group
    in its share, give or take a row or two: half reasoning prompts in every batch, and each kind of
    general prompt as often in the first quarter of training as in the last, so the reward models'
    trend over training is not which kinds came up (with a plain shuffle a quarter's helpfulness moved
    by more than the trend with the share of `repeat` prompts, which score lower)."""
    rng = random.Random(seed)
    keyed = []
    for group in groups:
        members, offset = list(group), rng.random()
        rng.shuffle(members)
        keyed += [((rank + offset) / len(members), index) for rank, index in enumerate(members)]
    return [index for _, index in sorted(keyed)]


def ensure_reward_model(stage: Stage) -> dict:
    """Train the stage's reward model unless the recipe gives one or it is already trained; its
    held-out pairwise accuracy goes into the manifest."""
    from data.chat import build_preferences
    from rewards.reward_model import train_reward_model

    settings = stage.section.get("reward_model") or {}
    uses_model = any(reward.name in REWARD_MODEL_REWARDS for reward in stage.rewards)
    if "path" in settings or not uses_model:
        return {}
    state, metrics = PartialState(), {}
    if state.is_main_process:
        training = {**TRAINING_DEFAULTS, **settings}
        seed, system = int(training["seed"]), system_prompt(stage)
        pairs = build_preferences(int(training["num_pairs"]), seed=seed, system_prompt=system)
        heldout = build_preferences(max(int(training["num_pairs"]) // 10, 20), seed=seed, system_prompt=system,
                                    split="heldout")  # other prompts than the training pairs'
        # Its own tokenizer: the reward model reads text, and a larger vocabulary than the tiny
        # policy's makes sequences shorter, training about 3x faster and more accurate.
        tokenizer = build_tokenizer((row["prompt"] + row[side] for row in pairs for side in ("chosen", "rejected")),
                                    vocab_size=RM_VOCAB_SIZE)
        metrics = train_reward_model(
            reward_model_path(settings, stage.stage_dir), pairs, tokenizer, heldout=heldout,
            max_steps=int(training["max_steps"]), learning_rate=float(training["learning_rate"]),
            hidden_size=int(training["hidden_size"]), num_layers=int(training["num_layers"]), seed=seed)
        log(f"align: reward model {reward_model_path(settings, stage.stage_dir)}: {metrics}")
    state.wait_for_everyone()
    return {f"reward_model/{key}": value for key, value in metrics.items() if isinstance(value, (int, float))}


def run(stage: Stage) -> dict:
    reward_model = ensure_reward_model(stage)
    return {**grpo.train(stage, build_dataset(stage), shuffle_dataset=False), **reward_model}
