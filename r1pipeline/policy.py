"""The policy: a preset of our DeepSeek-V3-architecture MoE trained from scratch, or any causal LM.

Presets live with the model (r1pipeline/model/config.py). Checkpoints of our model say
`model_type: deepseek_v3`, so transformers' Auto classes would load them into its own
DeepseekV3ForCausalLM; `load_pretrained` routes DeepSeek-V3 checkpoints to ours instead, which
also reads the ones transformers writes.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from r1pipeline.model import PRESETS, R1MoEConfig, R1MoEForCausalLM
from r1pipeline.schema import key

POLICY_CLASS = R1MoEForCausalLM
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class ModelSection:
    """A recipe's `model` section (r1pipeline/schema.py); pipeline.check_model checks how its keys
    combine (a preset or a checkpoint, config fields, LoRA with FP8)."""

    name_or_path: str | None = key(None, "hub name or local path of a causal LM to start from")
    preset: str | None = key(None, "name of a built-in policy configuration (trained from scratch)",
                             check=lambda name: name in PRESETS, what=f"one of {sorted(PRESETS)}")
    config: dict | None = key(None, "overrides of the preset's R1MoEConfig fields (DeepseekV3Config's plus fp8, "
                                    "bias_update_speed, ...)")
    tokenizer: str | None = key(None, "hub name or path of the tokenizer (default: the model's; built offline for "
                                      "a preset)")
    dtype: str = key("float32", "float32 | bfloat16 | float16", check=lambda name: name in DTYPES,
                     what=f"one of {sorted(DTYPES)}")
    seed: int = key(0, "seed of a preset's random initialisation")
    lora: dict | None = key(None, "train LoRA adapters instead of every weight: peft.LoraConfig fields (r, lora_alpha "
                                  "or alpha, lora_dropout, target_modules (default 'all-linear'), ...); each stage's "
                                  "final/ is the merged model")


def config_fields() -> set[str]:
    """What `model.config` may set: DeepseekV3Config's fields plus our training extras (fp8, ...)."""
    return set(R1MoEConfig().to_dict())


DISTILL_STUDENT = {"preset": "tiny-dense"}  # stage 5's default student (distill.student)


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
    from r1pipeline.hub import model_path

    name_or_path = model_path(name_or_path)
    if AutoConfig.from_pretrained(name_or_path).model_type == "deepseek_v3":
        return POLICY_CLASS.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])


LORA_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def lora_config(settings: dict | None):
    """`model.lora` as a peft.LoraConfig for TRL's `peft_config` (None: full fine-tuning). Keys are
    LoraConfig's fields (`r`, `lora_alpha`, `lora_dropout`, `target_modules`, ...); `alpha` and
    `dropout` are accepted for `lora_alpha` and `lora_dropout`. Raises ValueError naming a bad key."""
    if not settings:
        return None
    from peft import LoraConfig

    fields = {LORA_ALIASES.get(key, key): value for key, value in settings.items()}
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    for key in fields:
        if key not in known or key in ("task_type", "peft_type"):
            raise ValueError(f"unknown key {key!r}; LoraConfig fields: r, lora_alpha (alpha), lora_dropout "
                             "(dropout), target_modules, bias, use_rslora, modules_to_save, ...")
    fields.setdefault("target_modules", "all-linear")
    return LoraConfig(task_type="CAUSAL_LM", **fields)
