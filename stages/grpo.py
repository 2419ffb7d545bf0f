"""Stage 2, GRPO with rule-based rewards: TRL's GRPOTrainer, groups of `num_generations`
completions per prompt, the recipe's rewards and weights. Rollouts come from transformers
`generate` on CPU, or vLLM when `use_vllm: true` and vLLM is installed."""

import hashlib
import random
from pathlib import Path

import torch
from trl import GRPOConfig, GRPOTrainer

from data import render_prompt
from r1pipeline.pipeline import Stage, log
from rewards.text import completion_text
from stages.common import ExactResumeMixin, callbacks, load_policy, read_metrics, system_prompt, train_and_save, trainer_args


class ResumableGRPOTrainer(ExactResumeMixin, GRPOTrainer):
    """GRPOTrainer whose checkpoints also hold the rollout buffer.

    TRL generates a batch every `steps_per_generation * num_iterations` micro-steps and, after a
    resume, starts a fresh generation. A checkpoint that falls inside a generation batch would then
    train on different completions than the uninterrupted run; saving the buffer and TRL's step
    counter makes resume exact."""

    def _state_file(self, checkpoint: str) -> Path:
        return Path(checkpoint) / f"grpo_state_rank{self.accelerator.process_index}.pt"

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        torch.save({"step": self._step, "buffered_inputs": self._buffered_inputs},
                   self._state_file(self._checkpoint_dir(trial)))

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint and self._state_file(resume_from_checkpoint).is_file():
            state = torch.load(self._state_file(resume_from_checkpoint), weights_only=False)
            self._step, self._buffered_inputs = state["step"], state["buffered_inputs"]
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def build_dataset(stage: Stage):
    # Every other column (solution, kind, ...) reaches the reward functions as a keyword argument.
    system = system_prompt(stage)
    return stage.datasets["train"].map(lambda row: {"prompt": render_prompt(row["prompt"], system)})


def shuffled_within_groups(fn, group_size: int):
    """The control: `fn`'s rewards permuted among the completions of each group. Group means and
    spreads stay, so GRPO does the same work, but which completion earned what is lost. One
    permutation per batch, drawn from the batch's text, so every reward function (and a resumed run)
    permutes the same way."""

    def shuffled(prompts, completions, completion_ids=None, **columns):
        values = fn(prompts, completions, completion_ids=completion_ids, **columns)
        text = "\x00".join(map(completion_text, completions)).encode()
        rng = random.Random(hashlib.sha1(text).hexdigest())
        out = list(values)
        for start in range(0, len(values), group_size):
            group = list(range(start, min(start + group_size, len(values))))
            for i, j in zip(group, rng.sample(group, len(group))):
                out[i] = values[j]
        return out

    shuffled.__name__ = fn.__name__
    return shuffled


def reward_trend(stage_dir) -> dict:
    """Mean total reward over the first and the last quarter of logged steps."""
    rewards = [row["reward"] for row in read_metrics(stage_dir) if "reward" in row]
    if len(rewards) < 4:
        return {}
    quarter = len(rewards) // 4
    first, last = sum(rewards[:quarter]) / quarter, sum(rewards[-quarter:]) / quarter
    return {"reward_first_quarter": first, "reward_last_quarter": last}


def train(stage: Stage, dataset) -> dict:
    """GRPO from the stage's starting model over `dataset` (rendered prompts plus reward columns)."""
    model, tokenizer = load_policy(stage)
    tokenizer.padding_side = "left"
    args = GRPOConfig(**trainer_args(stage, model, reward_weights=[reward.weight for reward in stage.rewards]))
    reward_funcs = [reward.fn for reward in stage.rewards]
    if stage.section.get("shuffle_rewards"):
        log(f"{stage.name}: control run, rewards shuffled within each group of {args.num_generations}")
        reward_funcs = [shuffled_within_groups(fn, args.num_generations) for fn in reward_funcs]
    trainer = ResumableGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks(stage),
    )
    metrics = train_and_save(trainer, stage)
    metrics.update(reward_trend(stage.stage_dir))
    if "reward_first_quarter" in metrics:
        log(f"{stage.name}: mean reward {metrics['reward_first_quarter']:.3f} over the first quarter of steps, "
            f"{metrics['reward_last_quarter']:.3f} over the last")
    return metrics


def run(stage: Stage) -> dict:
    return train(stage, build_dataset(stage))
