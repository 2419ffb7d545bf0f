"""The policy: a preset of our DeepSeek-V3-architecture MoE trained from scratch, or any causal LM.

Presets live with the model (r1pipeline/model/config.py). Checkpoints of our model say
`model_type: deepseek_v3`, so transformers' Auto classes would load them into its own
DeepseekV3ForCausalLM; `load_pretrained` routes DeepSeek-V3 checkpoints to ours instead, which
also reads the ones transformers writes.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from r1pipeline.model import PRESETS, R1MoEConfig, R1MoEForCausalLM

POLICY_CLASS = R1MoEForCausalLM
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_fields() -> set[str]:
    """What `model.config` may set: DeepseekV3Config's fields plus our training extras (fp8, ...)."""
    return set(R1MoEConfig().to_dict())


def build_from_preset(preset: str, overrides: dict, tokenizer, seed: int, dtype: str = "float32"):
    """A freshly initialised policy whose vocabulary and special tokens are the tokenizer's."""
    fields = {**PRESETS[preset], **(overrides or {})}
    config = R1MoEConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )
    torch.manual_seed(seed)
    return POLICY_CLASS(config).to(DTYPES[dtype])


def load_pretrained(name_or_path: str, dtype: str = "float32"):
    if AutoConfig.from_pretrained(name_or_path).model_type == "deepseek_v3":
        return POLICY_CLASS.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
