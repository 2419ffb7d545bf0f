"""The policy: a preset of the DeepSeek-V3 architecture trained from scratch, or any causal LM.

Until our own model lands (r1pipeline.model, issue 3), transformers' DeepseekV3ForCausalLM stands
in for presets; swapping `POLICY_CLASS` is the one line to change.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

POLICY_CLASS = DeepseekV3ForCausalLM

# DeepseekV3Config field names. `tiny` is the embedded default: about 1M parameters, MLA attention,
# one dense layer then MoE layers of 8 fine-grained routed experts (top-2) plus a shared expert.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_fields() -> set[str]:
    return set(DeepseekV3Config().to_dict())


def build_from_preset(preset: str, overrides: dict, tokenizer, seed: int, dtype: str = "float32"):
    """A freshly initialised policy whose vocabulary and special tokens are the tokenizer's."""
    fields = {**PRESETS[preset], **(overrides or {})}
    config = DeepseekV3Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )
    torch.manual_seed(seed)
    return POLICY_CLASS(config).to(DTYPES[dtype])


def load_pretrained(name_or_path: str, dtype: str = "float32"):
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
