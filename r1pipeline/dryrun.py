"""`--dry-run` (`make plan`): what a recipe would do, checked and priced, before any GPU hour.

The recipe is validated exactly as a real run validates it (pipeline.plan: sections, keys and types,
model config, the datasets' first rows (a hub dataset streamed) loaded with their columns and golds
checked, rewards resolved, TRL's own config
checks, batch arithmetic for the world size); then this module prints the plan: per stage its input,
data, rewards and batch sizes, and for the policy its parameter count and an estimate of training
memory per device. Nothing is written and no weights are downloaded: a hub model's parameters are
counted from its config on the `meta` device.

The memory estimate is weights + gradients + Adam's two fp32 moments (+ an fp32 master copy under
mixed precision), divided by the number of processes when the accelerate config shards them (FSDP,
DeepSpeed ZeRO-3); activations, the KV cache, a GRPO reference model and a colocated vLLM engine
come on top and are named, not estimated.
"""

from __future__ import annotations

import contextlib
import io

import torch

from r1pipeline import config as cfg
from r1pipeline.pipeline import DRY_RUN_ROWS, accelerate_setup, needs_gpu

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024**3


def policy_config(model: dict):
    """The policy's transformers config: the preset's, or the checkpoint's (config.json only)."""
    from transformers import AutoConfig

    from r1pipeline.pipeline import preset_config

    if "preset" in model:  # the tokenizer is trained on the training texts: at most VOCAB_SIZE entries
        from data.tokenizer import VOCAB_SIZE

        config = preset_config(model)
        config.vocab_size = VOCAB_SIZE
        return config
    from r1pipeline.hub import model_path

    try:
        return AutoConfig.from_pretrained(model_path(model["name_or_path"]))
    except (OSError, ValueError) as exc:
        raise cfg.ConfigError(f"model.name_or_path = {model['name_or_path']!r}: its config cannot be read "
                              f"({str(exc).splitlines()[0]}); log in or download it, or give a local path") from None


def count_parameters(config, lora: dict | None = None) -> dict:
    """Total parameters, for a MoE those active per token, and those trained (all, or with `lora`
    the adapters'), from the config alone (meta device)."""
    from transformers import AutoModelForCausalLM

    from r1pipeline.policy import POLICY_CLASS

    with torch.device("meta"), contextlib.redirect_stderr(io.StringIO()):
        if config.model_type == "deepseek_v3":  # as load_pretrained loads a DeepSeek-V3 checkpoint
            from r1pipeline.model.checkpoint import config_from_checkpoint

            model = POLICY_CLASS(config_from_checkpoint(config.to_dict()))
        else:
            model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name and "shared" not in name)
    experts, top_k = getattr(config, "n_routed_experts", None), getattr(config, "num_experts_per_tok", None)
    active = total - routed + (routed * top_k // experts if experts and routed else 0)
    trainable = total
    if lora:
        from peft import get_peft_model

        from r1pipeline.policy import lora_config

        with torch.device("meta"):
            adapted = get_peft_model(model, lora_config(lora))
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    return {"total": total, "active": active, "trainable": trainable}


def training_memory(parameters: int, trainable: int, dtype: str, setup: dict) -> float:
    """GiB per device for weights, gradients and Adam states (see the module docstring)."""
    weight = BYTES[dtype]
    master = 4 if setup["mixed_precision"] != "no" and weight == 4 else 0
    total = parameters * weight + trainable * (weight + 8 + master)
    return total / (setup["processes"] if setup["sharded"] else 1) / GIB


def _batch(stage) -> str:
    fields, world = stage.trl_fields, stage.world_size
    per_device = fields.get("per_device_train_batch_size", cfg.field_default(stage.name, "per_device_train_batch_size"))
    accumulation = fields.get("gradient_accumulation_steps", 1)
    steps = fields.get("max_steps", -1)
    length = f"{steps} steps" if steps and steps > 0 else f"{fields.get('num_train_epochs', 3)} epochs"
    text = (f"{length}; batch {per_device} per device x {world} process(es) x {accumulation} accumulation "
            f"= {per_device * world * accumulation}; lr {fields.get('learning_rate', cfg.field_default(stage.name, 'learning_rate'))}")
    if stage.name in ("grpo", "align"):
        generations = fields.get("num_generations", cfg.field_default("grpo", "num_generations"))
        completions = per_device * world * (fields.get("steps_per_generation") or accumulation)
        text += (f"; {completions // generations} prompts x {generations} completions per generation batch, "
                 f"up to {fields.get('max_completion_length', cfg.field_default('grpo', 'max_completion_length'))} "
                 f"tokens each; rollouts with {_rollouts(stage)}")
    if world > 1:
        text += (f"; a stuck collective raises after ddp_timeout = {_field(stage, 'ddp_timeout')} s "
                 "instead of hanging")
    return text


def _field(stage, key: str):
    """The stage's TRL field, or TRL's default for it."""
    return stage.trl_fields.get(key, cfg.field_default(stage.name, key))


def _rollouts(stage) -> str:
    if not stage.trl_fields.get("use_vllm"):
        return "transformers"
    if _field(stage, "vllm_mode") != "server":
        return "vLLM, colocated in each training process"
    where = stage.trl_fields.get("vllm_server_base_url") or f"{_field(stage, 'vllm_server_host')}:{_field(stage, 'vllm_server_port')}"
    return (f"the vLLM server at {where} (start it first with `trl vllm-serve`; the trainers wait "
            f"vllm_server_timeout = {_field(stage, 'vllm_server_timeout'):g} s for it, then raise)")


def describe(recipe: dict, planned: list, heldout, accelerate_config: str | None) -> str:
    """The plan as text: model, devices, data, then one block per stage."""
    model = recipe.get("model") or {}
    config = policy_config(model)
    counted = count_parameters(config, model.get("lora"))
    setup = accelerate_setup(accelerate_config)
    dtype = model.get("dtype", "float32")
    lines = ["r1pipeline plan (dry run: validated, nothing trained or written)"]
    source = f"preset {model['preset']!r}" if "preset" in model else repr(model["name_or_path"])
    moe = f", {counted['active'] / 1e6:,.2f}M active per token" if counted["active"] != counted["total"] else ""
    vocabulary = f" (vocabulary <= {config.vocab_size})" if "preset" in model else ""
    lines.append(f"model: {source} ({config.model_type}), {counted['total'] / 1e6:,.2f}M parameters{vocabulary}{moe}, "
                 f"{dtype}")
    per_machine = f", {setup['processes'] // setup['machines']} per machine" if setup["machines"] > 1 else ""
    lines.append(f"devices: {setup['processes']} process(es) on {setup['machines']} machine(s){per_machine}"
                 + (f" ({setup['config']}: {setup['distributed_type']}"
                    f"{', ' + setup['sharded'] if setup['sharded'] else ''}, mixed precision {setup['mixed_precision']})"
                    if setup["config"] else ""))
    memory = training_memory(counted["total"], counted["trainable"], dtype, setup)
    if model.get("lora"):
        lines.append(f"LoRA: {counted['trainable'] / 1e6:,.2f}M trainable parameters "
                     f"({100 * counted['trainable'] / counted['total']:.2f} %); final/ holds the merged model")
    lines.append(f"training memory per device, estimated: {memory:,.2f} GiB for weights, gradients and Adam states"
                 f"{' (sharded ' + str(setup['processes']) + ' ways)' if setup['sharded'] else ''}; activations, "
                 "KV cache, a reference model (beta > 0) and a colocated vLLM engine come on top")
    data = recipe.get("data") or {}
    if planned:
        train = planned[0].datasets["train"]
        sampled = data.get("source", "synthetic") not in ("synthetic", "coding")
        rows = (f"{len(train)} training rows checked (a dry run reads the first {DRY_RUN_ROWS} of each split; the "
                "run loads all)") if sampled else f"{len(train)} training rows"
        lines.append(f"data: {data.get('source', 'synthetic')} {data.get('path', '')}".rstrip()
                     + f": {rows}, columns {train.column_names}")
    if heldout is not None:
        lines.append(f"held-out: {len(heldout)} problems (eval)")
    for stage in planned:
        ref = stage.input_path() or f"preset {stage.model_section.get('preset')}"
        lines.append(f"- {stage.name}: from {ref} -> {stage.stage_dir / 'final'}")
        if stage.sample_from:
            lines.append(f"    samples from {stage.sample_path()}")
        if stage.rewards:
            lines.append("    rewards: " + ", ".join(f"{r.name} x {r.weight:g}" for r in stage.rewards))
        lines.append("    " + _batch(stage))
        if needs_gpu(stage.trl_fields):
            lines.append("    needs a GPU: bf16/fp16 training (this machine has none; set bf16: false to run here)")
    return "\n".join(lines)
