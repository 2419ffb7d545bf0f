"""GRPO with LoRA (`model.lora`) and `use_vllm` colocated on the real engine (vLLM's CPU build): each
sync merges the adapter into our MoE's weights, sends them in checkpoint format, unmerges, and the
read-back finds the engine equal to the merged policy; the engine's logprobs are the adapted model's."""

import os

import pytest

pytest.importorskip("vllm")
import torch
from datasets import Dataset
from trl import GRPOConfig

from data import build_tokenizer
from r1pipeline import policy, vllm_engine
from stages.grpo import CheckpointFormatVLLM, ResumableGRPOTrainer
from test_vllm_grpo import SEQUENCE, TEXTS


def test_lora_grpo_syncs_the_merged_adapter_into_vllm(tmp_path, monkeypatch):
    environ = dict(os.environ)
    tokenizer = build_tokenizer(TEXTS)
    tokenizer.padding_side = "left"
    policy.build_from_preset("tiny-vllm", {}, tokenizer, seed=0).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), use_vllm=True, vllm_mode="colocate", use_cpu=True,
                      report_to=[], num_generations=4, per_device_train_batch_size=8, max_completion_length=8,
                      max_steps=3, learning_rate=1e-2, logging_steps=1, vllm_max_model_length=128,
                      save_strategy="no", bf16=False)
    trainer = ResumableGRPOTrainer(
        model=policy.load_pretrained(str(tmp_path / "policy")), processing_class=tokenizer, args=args,
        reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
        train_dataset=Dataset.from_dict({"prompt": [t.split("=")[0] + "=" for t in TEXTS[:48]]}),
        peft_config=policy.lora_config({"r": 4, "alpha": 8}))  # all linear layers, kv_b_proj included
    try:
        generation = trainer.vllm_generation
        assert type(generation) is CheckpointFormatVLLM and generation.verify_sync
        gaps, real_sync = [], CheckpointFormatVLLM.sync_weights

        def checked_sync(self):
            real_sync(self)  # raises WeightSyncError if the read-back differs from the merged policy
            ids = tokenizer(SEQUENCE, add_special_tokens=False)["input_ids"]
            delta = vllm_engine.prompt_logprobs(self.llm, ids) - vllm_engine.model_logprobs(trainer.model, ids)
            gaps.append(delta.abs().max().item())

        monkeypatch.setattr(CheckpointFormatVLLM, "sync_weights", checked_sync)
        lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
        trainer.train()
        assert len(gaps) == 3 and all(gap < 1e-4 for gap in gaps), gaps
        assert any(not torch.equal(lora_b[n], p) for n, p in trainer.model.named_parameters() if "lora_B" in n)
        assert not any(layer.merged for layer in trainer.model.modules() if hasattr(layer, "merged")), \
            "the adapter is unmerged again after each sync"
    finally:
        vllm_engine.shutdown(trainer.vllm_generation.llm)
        os.environ.clear()
        os.environ.update(environ)
