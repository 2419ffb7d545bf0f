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


def test_the_policys_mtp_and_balance_losses_are_trained(tmp_path):
    """TRL's fused LM head runs the backbone alone; the trainer adds λ·L_MTP and the balance loss back, so
    its loss is the model's own forward loss and the MTP module learns. Negative control: TRL's SFTTrainer
    as it is gives the MTP module no gradient."""
    import torch

    recipe = apply_overrides(load_recipe("tiny"), [*FAST_DATA, *FAST_SFT, "sft.per_device_train_batch_size=4",
                                                   "model.config.mtp_loss_weight=0.3"])
    (stage,) = plan(recipe, ["sft"], Path(tmp_path) / "run")
    model, tokenizer = load_policy(stage)
    assert len(model.mtp) and model.config.mtp_loss_weight and model.config.seq_aux_alpha
    losses, grads = {}, {}
    for name, trainer_class in (("ours", sft.ResumableSFTTrainer), ("trl", sft.SFTTrainer)):
        trainer = trainer_class(model=model, args=sft.SFTConfig(**sft.trainer_args(stage, model)),
                                train_dataset=sft.build_dataset(stage), processing_class=tokenizer)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        trainer.current_gradient_accumulation_steps = 1  # as the training loop sets it
        model.train()
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=(batch["labels"][:, 1:] != -100).sum())
        loss.backward()
        losses[name] = loss.item()
        grads[name] = sum(p.grad.abs().sum().item() for p in model.mtp.parameters() if p.grad is not None)
    own = model(**batch)  # the model's own forward: CE + λ·L_MTP + balance losses
    assert own.mtp_loss > 0 and own.aux_loss > 0
    assert abs(losses["ours"] - own.loss.item()) < 1e-5 * own.loss.item()
    # With the step's target counts (what get_batch_samples counts over accumulation steps and processes;
    # here one micro-batch on one process), the sums over those counts are the same means.
    trainer = sft.ResumableSFTTrainer(model=model, args=sft.SFTConfig(**sft.trainer_args(stage, model)),
                                      train_dataset=sft.build_dataset(stage), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trainer._mtp_items = model.mtp_target_counts(batch["labels"])
    counted = trainer.compute_loss(model, dict(batch), num_items_in_batch=(batch["labels"][:, 1:] != -100).sum())
    assert abs(counted.item() - own.loss.item()) < 1e-5 * own.loss.item()
    assert grads["ours"] > 0
    assert grads["trl"] == 0, "TRL's fused head alone leaves the MTP module untrained (the control)"
    assert losses["trl"] < losses["ours"]
