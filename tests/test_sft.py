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


def one_forward_and_split(tmp_path, monkeypatch, overrides: list[str]):
    """A trainer's loss on a micro-batch of worked-out rows and bare answers, computed in one forward over
    the padded batch ("whole") and as the trainer splits it ("split": length groups, a shared prefix), each
    from zero gradients and load counts: (model, batch, {mode: (loss, gradients, logged metrics, the
    shapes the model's forwards took, expert loads)}). The balance loss is raised to show in the loss."""
    import torch

    from r1pipeline.model import routing
    from r1pipeline.model.layers import MoE
    from stages import rollouts

    recipe = apply_overrides(load_recipe("tiny"), [*FAST_DATA, *FAST_SFT, "sft.per_device_train_batch_size=16",
                                                   *overrides])
    (stage,) = plan(recipe, ["sft"], Path(tmp_path) / "run")
    model, tokenizer = load_policy(stage)
    for module in model.modules():
        if isinstance(module, MoE):
            module.seq_aux_alpha = 0.1
    trainer = sft.ResumableSFTTrainer(model=model, args=sft.SFTConfig(**sft.trainer_args(stage, model)),
                                      train_dataset=sft.build_dataset(stage), processing_class=tokenizer)
    rows = trainer.train_dataset
    batch = trainer.data_collator([rows[i] for i in range(0, len(rows), len(rows) // 16)][:16])
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.max() - lengths.min() > 30  # worked-out rows and bare answers
    trainer.current_gradient_accumulation_steps = 1
    if model.config.mtp_loss_weight:
        trainer._mtp_items = model.mtp_target_counts(batch["labels"])  # as get_batch_samples counts them
    model.train()
    results, calls = {}, []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: calls.append(kw["input_ids"].shape) or real(*a, **kw))
    for name, overhead in (("whole", 10 ** 9), ("split", 0)):
        monkeypatch.setattr(rollouts, "BUCKET_OVERHEAD_TOKENS", overhead)
        model.zero_grad()
        calls.clear()
        for gate in routing.moe_gates(model):
            gate.expert_load.zero_()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=(batch["labels"][:, 1:] != -100).sum())
        loss.backward()
        logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
        results[name] = (loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None], logged,
                         list(calls), [gate.expert_load.clone() for gate in routing.moe_gates(model)])
    assert all(module.prefix_sums is None for module in model.modules() if isinstance(module, MoE))
    return model, batch, results


def assert_same_training(whole, split, logged: tuple[str, ...]):
    import torch

    assert abs(split[0] - whole[0]) < 1e-5 * whole[0]
    assert len(split[1]) == len(whole[1])
    for a, b in zip(split[1], whole[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for key in logged:
        assert abs(split[2][key] - whole[2][key]) < 1e-5, key
    for a, b in zip(split[4], whole[4]):
        assert torch.equal(a, b) and a.sum() > 0


def test_a_micro_batch_in_length_groups_trains_and_logs_what_one_forward_does(tmp_path, monkeypatch):
    """Rows grouped by length, each group cut after its longest row: the same loss (the MTP loss and the
    balance losses, means over sequences, included), gradients, logged entropy / token accuracy / MTP loss
    and load counts as one forward over the padded micro-batch."""
    model, batch, results = one_forward_and_split(tmp_path, monkeypatch, ["model.config.mtp_loss_weight=0.3"])
    whole, groups = results["whole"], results["split"]
    assert whole[2]["mtp_loss"] > 0 and groups[2]["num_tokens"] == 2 * whole[2]["num_tokens"]  # (counted since the start)
    assert len(whole[3]) == 1 and len(groups[3]) > 2
    assert sum(rows for rows, _ in groups[3]) == len(batch["input_ids"]), "no shared prefix with the MTP loss on"
    assert sum(shape[0] * shape[1] for shape in groups[3]) < 0.9 * whole[3][0][0] * whole[3][0][1]
    assert_same_training(whole, groups, (*sft.PER_CALL, "mtp_loss"))


def test_the_rows_shared_first_tokens_computed_once_train_what_whole_rows_do(tmp_path, monkeypatch):
    """The system prompt and the template's first words, the same in every row and read by no loss, are
    computed once for the micro-batch (a KV cache the rows' forwards attend to): the same loss (the
    sequence-wise balance loss, a mean over whole sequences, included), gradients, logged entropy / token
    accuracy and routing-bias load counts as one forward over the padded micro-batch, with fewer tokens."""
    model, batch, results = one_forward_and_split(tmp_path, monkeypatch, [])
    assert not model.config.mtp_loss_weight
    shared = sft.ResumableSFTTrainer._shared_length(model, batch, 0)
    first_label = int((batch["labels"] != -100).any(0).nonzero()[0])
    assert 20 < shared < first_label  # the system prompt, then "User: What is", before the first label
    whole, parts = results["whole"], results["split"]
    assert len(whole[3]) == 1 and whole[3][0][1] == batch["input_ids"].shape[1]
    assert parts[3][0] == (1, shared) and all(width < whole[3][0][1] - shared + 1 for _, width in parts[3][1:])
    assert sum(shape[0] * shape[1] for shape in parts[3]) < 0.7 * whole[3][0][0] * whole[3][0][1]
    assert_same_training(whole, parts, sft.PER_CALL)
