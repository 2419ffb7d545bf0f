"""Stage 1 trains on the completion only, in the R1 template, on the real SFTTrainer batch."""

from pathlib import Path

from conftest import FAST_DATA, FAST_SFT
from data import render_prompt
from r1pipeline.config import apply_overrides, load_recipe
from r1pipeline.pipeline import plan
from stages import sft
from stages.common import completion_of, load_policy, system_prompt


def test_loss_is_on_the_completion_only(tmp_path):
    recipe = apply_overrides(load_recipe("tiny"), [*FAST_DATA, *FAST_SFT, "sft.per_device_train_batch_size=4"])
    (stage,) = plan(recipe, ["sft"], Path(tmp_path) / "run")
    model, tokenizer = load_policy(stage)
    trainer = sft.ResumableSFTTrainer(model=model, args=sft.SFTConfig(**sft.trainer_args(stage, model)),
                                      train_dataset=sft.build_dataset(stage), processing_class=tokenizer)
    row = stage.datasets["train"][0]
    prompt_ids = tokenizer(render_prompt(row["prompt"], system_prompt(stage))).input_ids
    completion_ids = tokenizer(completion_of(row)).input_ids + [tokenizer.eos_token_id]
    assert completion_of(row).startswith("<think>\n") and "</think>\n<answer>\n" in completion_of(row)

    example = trainer.train_dataset[0]
    batch = trainer.data_collator([example])
    labels = batch["labels"][0].tolist()
    ids = batch["input_ids"][0].tolist()
    assert ids[: len(prompt_ids) + len(completion_ids)] == prompt_ids + completion_ids
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids), "no loss on the prompt"
    assert labels[len(prompt_ids): len(prompt_ids) + len(completion_ids)] == completion_ids, \
        "loss on every completion token, the closing eos included"
