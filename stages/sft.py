"""Stage 1, cold-start SFT: teach the R1 format (reasoning in <think>, then <answer>) with TRL's
SFTTrainer, the loss on the completion only."""

import dataclasses

from trl import SFTConfig, SFTTrainer

from r1pipeline.config import INIT_FROM_HELP
from r1pipeline.pipeline import Stage
from r1pipeline.schema import key
from stages.common import (ExactResumeMixin, callbacks, completion_of, load_policy, peft_config, sft_row,
                           train_and_save, trainer_args)


@dataclasses.dataclass
class Options:
    """The stage's own keys; every other key of the `sft` section is an SFTConfig field."""

    init_from: str = key("model", INIT_FROM_HELP)


class ResumableSFTTrainer(ExactResumeMixin, SFTTrainer):
    pass


def build_dataset(stage: Stage):
    train = stage.datasets["train"]
    return train.map(lambda row: sft_row(stage, row["prompt"], completion_of(row)), remove_columns=train.column_names)


def train(stage: Stage, dataset, model, tokenizer, final=None) -> dict:
    """SFT on prompt-completion rows (stage 1's data, or stage 3's selected samples), saved to
    `final` (default: the stage's final/)."""
    # completion_only_loss=None means TRL's default for prompt-completion data: loss on the completion.
    args = SFTConfig(**trainer_args(stage, model))
    trainer = ResumableSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  callbacks=callbacks(stage), peft_config=peft_config(stage))
    return train_and_save(trainer, stage, final)


def run(stage: Stage) -> dict:
    model, tokenizer = load_policy(stage)
    return train(stage, build_dataset(stage), model, tokenizer)
