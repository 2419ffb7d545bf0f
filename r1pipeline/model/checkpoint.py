"""Checkpoints in the DeepSeek-V3 layout, readable by transformers' DeepseekV3ForCausalLM and vLLM.

In memory                                 In the checkpoint
model.layers.i.mlp.experts.gate_up_proj   model.layers.i.mlp.experts.{e}.{gate_proj,up_proj}.weight
model.layers.i.mlp.experts.down_proj      model.layers.i.mlp.experts.{e}.down_proj.weight
mtp.k.*                                   model.layers.{num_hidden_layers + k}.*  (+ copies of embed_tokens
                                          and the head, as DeepSeek ships them)
config model_type r1_moe                  model_type deepseek_v3, topk_method noaux_tc, scoring_func sigmoid

With fp8: the linear layers of attention, dense MLP, shared and routed experts as e4m3 `weight` plus
fp32 `weight_scale_inv` (128x128 blocks), everything else bf16, the routing bias fp32, and the
`quantization_config` DeepSeek publishes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import FP8_BLOCK, R1MoEConfig
from .fp8 import dequantize_blocks, quantize_blocks

QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
FP8_WEIGHT = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                        r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")
FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # DeepSeek stores them; we share ours


def _checkpoint_names(state_dict: dict, config: R1MoEConfig, include_mtp: bool) -> Iterator[tuple[str, torch.Tensor]]:
    L = config.num_hidden_layers
    for name, tensor in state_dict.items():
        if name.startswith("mtp."):
            if not include_mtp:
                continue
            k, rest = name[len("mtp."):].split(".", 1)
            name = f"model.layers.{L + int(k)}.{rest}"
        fused = FUSED_EXPERTS.match(name)
        if fused is None:
            yield name, tensor
        elif fused[2] == "down_proj":
            for e, w in enumerate(tensor):
                yield f"{fused[1]}.{e}.down_proj.weight", w                  # [H, inter]
        else:
            gate, up = tensor.chunk(2, dim=1)                                # [E, inter, H] each
            for e in range(tensor.shape[0]):
                yield f"{fused[1]}.{e}.gate_proj.weight", gate[e]
                yield f"{fused[1]}.{e}.up_proj.weight", up[e]
    if include_mtp:
        for k in range(config.num_nextn_predict_layers):
            yield f"model.layers.{L + k}.embed_tokens.weight", state_dict["model.embed_tokens.weight"]
            yield f"model.layers.{L + k}.shared_head.head.weight", state_dict["lm_head.weight"]


def checkpoint_tensors(model, fp8: bool, include_mtp: bool = True, state_dict: dict | None = None):
    """(name, tensor) pairs in the DeepSeek-V3 checkpoint format; also what vLLM's DeepseekV3
    `load_weights` takes (give include_mtp=False unless vLLM runs MTP speculation)."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    # Layers wrapped by LoRA (peft) hold their weight as `<layer>.base_layer.weight`: with the adapter
    # merged into it (the caller's part), that is the checkpoint's `<layer>.weight`.
    state_dict = {name.replace(".base_layer.", "."): tensor for name, tensor in state_dict.items()
                  if ".lora_" not in name}
    for name, tensor in _checkpoint_names(state_dict, model.config, include_mtp):
        tensor = tensor.detach()
        if name.endswith("e_score_correction_bias"):
            yield name, tensor.float()
        elif fp8 and FP8_WEIGHT.search(name):
            q, scale = quantize_blocks(tensor)
            yield name, q
            yield name + "_scale_inv", scale
        else:
            yield name, tensor.to(torch.bfloat16) if fp8 else tensor


def _shard_limit(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: give bytes or e.g. '500MB', '5GB'")
    return int(match[1]) * units[match[2]]


def checkpoint_config(config: R1MoEConfig, dtype: torch.dtype) -> dict:
    raw = config.to_dict()
    raw.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
               num_nextn_predict_layers=config.num_nextn_predict_layers)
    raw["dtype"] = "bfloat16" if config.fp8 else str(dtype).removeprefix("torch.")
    raw.pop("quantization_config", None)
    if config.fp8:
        raw["quantization_config"] = QUANTIZATION_CONFIG
    return raw


def save(model, save_directory, state_dict: dict | None = None, max_shard_size="5GB") -> None:
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(checkpoint_config(model.config, model.dtype), indent=2) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    limit, shards, size = _shard_limit(max_shard_size), [{}], 0
    for name, tensor in checkpoint_tensors(model, model.config.fp8, include_mtp=True, state_dict=state_dict):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous().clone()  # expert slices share storage; safetensors refuses that
        size += nbytes
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(directory / file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def model_state_dict(tensors: dict[str, torch.Tensor], config: R1MoEConfig) -> dict[str, torch.Tensor]:
    """Checkpoint names -> in-memory names: dequantise FP8, stack experts, move MTP layers to `mtp.k`."""
    L, D = config.num_hidden_layers, config.num_nextn_predict_layers
    state, experts = {}, {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv") or name.endswith("activation_scale"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            tensor = dequantize_blocks(tensor, tensors[name + "_scale_inv"])
        layer = LAYER.match(name)
        if layer and int(layer[1]) >= L:
            k = int(layer[1]) - L
            if k >= D or layer[2] in MTP_COPIES:
                continue
            name = f"mtp.{k}.{layer[2]}"
        per_expert = PER_EXPERT.match(name)
        if per_expert:
            experts.setdefault(per_expert[1], {}).setdefault(per_expert[3], {})[int(per_expert[2])] = tensor
        else:
            state[name] = tensor
    for prefix, parts in experts.items():
        stack = {proj: torch.stack([w[e] for e in sorted(w)]) for proj, w in parts.items()}
        state[f"{prefix}.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)  # [E, 2I, H]
        state[f"{prefix}.down_proj"] = stack["down_proj"]                                          # [E, H, I]
    return state


def _resolve_dtype(dtype, raw: dict) -> torch.dtype:
    if dtype is None:
        return torch.float32  # fp32 master weights unless asked otherwise
    if dtype == "auto":
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def config_from_checkpoint(raw: dict) -> R1MoEConfig:
    """Our config from a DeepSeek-V3 checkpoint's config.json (ours, transformers' or DeepSeek's). FP8
    compute is ours to switch on: a DeepSeek FP8 checkpoint loads as dequantised master weights."""
    return R1MoEConfig.from_dict({k: v for k, v in raw.items()
                                  if k not in ("model_type", "architectures", "quantization_config")})


def load(cls, name_or_path, config: R1MoEConfig | None = None, dtype=None):
    directory = Path(name_or_path)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors"]))
    raw = json.loads((directory / "config.json").read_text())
    if config is None:
        config = config_from_checkpoint(raw)
    # As transformers' from_pretrained does: TRL starts a colocated vLLM from model.name_or_path.
    config._name_or_path = str(name_or_path)
    model = cls(config)
    state = model_state_dict(_read_tensors(directory), config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A checkpoint without MTP layers (e.g. saved by transformers) leaves the MTP modules initialised.
    missing = [name for name in missing if not name.startswith("mtp.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit {cls.__name__}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return model.to(_resolve_dtype(dtype, raw)).eval()
