"""Our model as the policy of real TRL trainers: a couple of SFTTrainer and GRPOTrainer steps on CPU,
with the routing-bias callback applied after each optimizer step."""

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from data import build_tokenizer
from r1pipeline.model import PRESETS, R1MoEConfig, R1MoEForCausalLM, RoutingBiasCallback

TEXTS = [f"{a} + {b} = {a + b}" for a in range(20) for b in range(10)]


def policy(tokenizer):
    torch.manual_seed(0)
    config = R1MoEConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **PRESETS["tiny"])
    return R1MoEForCausalLM(config)


def common(tmp_path):
    return dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, learning_rate=1e-3)


def routing_bias(model):
    return model.model.layers[1].mlp.gate.e_score_correction_bias.clone()


@pytest.mark.slow
def test_sft_trainer_steps_with_our_policy(tmp_path):
    tokenizer = build_tokenizer(TEXTS)
    model = policy(tokenizer)
    bias = routing_bias(model)
    callback = RoutingBiasCallback()
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": TEXTS[:32]}),
                         args=SFTConfig(max_length=32, **common(tmp_path)), callbacks=[callback])
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(bias, routing_bias(model))
    assert callback.imbalance >= 1.0
    trainer.save_model(str(tmp_path / "final"))  # the Trainer's save path writes the DeepSeek-V3 layout
    reloaded = R1MoEForCausalLM.from_pretrained(tmp_path / "final")
    model.load_state_dict(reloaded.state_dict(), strict=True)


@pytest.mark.slow
def test_grpo_trainer_steps_with_our_policy(tmp_path):
    tokenizer = build_tokenizer(TEXTS)
    model = policy(tokenizer)

    def digits(completions, **kwargs):
        return [float(sum(ch.isdigit() for ch in c)) for c in completions]

    prompts = Dataset.from_dict({"prompt": [t.split("=")[0] + "=" for t in TEXTS[:8]]})
    args = GRPOConfig(num_generations=4, max_completion_length=8, **common(tmp_path))
    trainer = GRPOTrainer(model=model, reward_funcs=digits, args=args, train_dataset=prompts,
                          processing_class=tokenizer, callbacks=[RoutingBiasCallback()])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 2
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_our_grpo_config_generates_with_the_kv_cache(tmp_path):
    """transformers' Trainer sets config.use_cache=False; our GRPO config turns the cache back on for
    generation (without it every decode step re-runs the whole sequence) and keeps the recipe's own
    generation_kwargs."""
    from r1pipeline.pipeline import Stage
    from stages.grpo import grpo_config

    stage = Stage(name="grpo", run_dir=tmp_path, recipe={}, init_from="sft",
                  trl_fields={"use_cpu": True, "bf16": False, "generation_kwargs": {"min_p": 0.1}})
    args = grpo_config(stage, model=None)
    assert args.generation_kwargs == {"use_cache": True, "min_p": 0.1}
    stage.trl_fields["generation_kwargs"] = {"use_cache": False}
    assert grpo_config(stage, model=None).generation_kwargs == {"use_cache": False}, "an explicit choice wins"
