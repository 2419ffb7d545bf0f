"""`make export RUN=... STAGE=... [TYPE=f32|f16|bf16|q8_0]`, or
`python -m r1pipeline export --run R --stage S --gguf [--type T]`: a stage's final checkpoint as one
GGUF file for llama.cpp (`llama-server -m model.gguf --jinja`) and Ollama, with its tokenizer and
chat template, a .sha256 beside it and an Ollama Modelfile.

The writer is ours, on PyPI `gguf` (llama.cpp's own gguf-py); llama.cpp's `convert_hf_to_gguf.py` is
not a package and rejects any vocabulary it does not know by hash, ours included. Architectures:
- our DeepSeek-V3 policy, in llama.cpp's mapping (arch `deepseek2`, src/models/deepseek2.cpp):
  MLA absorbed (`key_length_mla`/`value_length_mla` written), `kv_b_proj` split into `attn_k_b`
  (the key half, transposed) and `attn_v_b`; one KV head; routed experts stacked per layer; the
  routing bias as `exp_probs_b.bias`; sigmoid gating (`expert_gating_func = 2`: without it
  llama.cpp routes by softmax); group-limited routing keys only when topk_group < n_group
  (llama.cpp aborts on topk_group == n_group, which restricts nothing); FP8 checkpoints
  dequantised; the MTP module dropped (llama.cpp's converter drops it too: it serves speculation
  only);
- the dense stock architectures `llama` (Llama 2/3, the query/key rows permuted to llama.cpp's
  adjacent-pair rotation; Llama 3.1/3.2's `llama3` rope scaling as the `rope_freqs` factors) and
  `qwen2` (Qwen2/2.5, query/key/value biases, rotate-half kept), as convert_hf_to_gguf.py writes
  them; tied embeddings leave `output.weight` out (llama.cpp then reads `token_embd`).
Tokenizers are byte-level BPE, written as `gpt2` with the llama.cpp pre-tokenizer that splits
like the tokenizer's own: ours (single digits, then the GPT-2 regex) as `refact`, Qwen2's regex as
`qwen2`, Llama 3's as `llama-bpe`; eos/pad/bos ids and whether a BOS is prepended are written as
the tokenizer behaves (llama.cpp's BPE defaults are wrong for ours).
Refused with the reason: other architectures and tokenizers (llama.cpp's converter knows more
stock ones), `rope_interleave: false`, other rope scalings, sliding windows, biases llama.cpp's
llama does not read, and 26/27-layer DeepSeek models with `q_lora_rank` (llama.cpp reads those as
DeepSeek-V2-Lite and expects `attn_q`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

TYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = {"deepseek_v3": "deepseek2", "llama": "llama", "qwen2": "qwen2"}  # HF model_type: llama.cpp arch
PRE_TOKENIZER = "refact"  # llama.cpp's name for `\p{N}` single digits, then the GPT-2 regex
# The split regexes of the stock tokenizers' tokenizer.json (then byte-level without a regex), by
# llama.cpp pre-tokenizer name; they differ in digits: Qwen2 splits single digits, Llama 3 up to three.
_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
STOCK_SPLITS = {_SPLIT % r"\p{N}": "qwen2", _SPLIT % r"\p{N}{1,3}": "llama-bpe"}


class ExportError(ValueError):
    """A checkpoint this exporter cannot write so that llama.cpp reads it right."""


def hparams(config: dict) -> list[tuple[str, tuple]]:
    """(GGUFWriter method, arguments) for the model's `deepseek2.*` keys."""
    import gguf

    n_group, topk_group = config.get("n_group") or 1, config.get("topk_group") or 1
    keys = [("add_context_length", (config["max_position_embeddings"],)),
            ("add_embedding_length", (config["hidden_size"],)),
            ("add_block_count", (config["num_hidden_layers"],)),
            ("add_feed_forward_length", (config["intermediate_size"],)),
            ("add_head_count", (config["num_attention_heads"],)),
            ("add_head_count_kv", (1,)),  # MLA as MQA over the latent
            ("add_layer_norm_rms_eps", (config["rms_norm_eps"],)),
            ("add_rope_freq_base", (rope_theta(config),)),
            ("add_rope_dimension_count", (config["qk_rope_head_dim"],)),
            ("add_kv_lora_rank", (config["kv_lora_rank"],)),
            ("add_key_length", (config["kv_lora_rank"] + config["qk_rope_head_dim"],)),
            ("add_value_length", (config["kv_lora_rank"],)),
            ("add_key_length_mla", (config["qk_nope_head_dim"] + config["qk_rope_head_dim"],)),
            ("add_value_length_mla", (config["v_head_dim"],)),
            ("add_leading_dense_block_count", (config["first_k_dense_replace"],)),
            ("add_vocab_size", (config["vocab_size"],))]
    if config.get("q_lora_rank"):
        keys.append(("add_q_lora_rank", (config["q_lora_rank"],)))
    # The expert keys go in for an all-dense model too (leading_dense_block_count = block_count, as the
    # distillation student): llama.cpp reads them for every deepseek2 model and will not load without.
    keys += [("add_expert_count", (config["n_routed_experts"],)),
             ("add_expert_used_count", (config["num_experts_per_tok"],)),
             ("add_expert_shared_count", (config["n_shared_experts"],)),
             ("add_expert_feed_forward_length", (config["moe_intermediate_size"],)),
             ("add_expert_weights_scale", (float(config["routed_scaling_factor"]),)),
             ("add_expert_weights_norm", (bool(config["norm_topk_prob"]),)),
             ("add_expert_gating_func", (gguf.ExpertGatingFuncType.SIGMOID,))]
    if n_group > 1 and topk_group < n_group:
        keys += [("add_expert_group_count", (n_group,)), ("add_expert_group_used_count", (topk_group,))]
    return keys


def rope_theta(config: dict) -> float:
    return float((config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0)


def stock_hparams(config: dict) -> list[tuple[str, tuple]]:
    """(GGUFWriter method, arguments) for a llama or qwen2 model's keys."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    keys = [("add_context_length", (config["max_position_embeddings"],)),
            ("add_embedding_length", (config["hidden_size"],)),
            ("add_block_count", (config["num_hidden_layers"],)),
            ("add_feed_forward_length", (config["intermediate_size"],)),
            ("add_head_count", (heads,)),
            ("add_head_count_kv", (config.get("num_key_value_heads") or heads,)),
            ("add_layer_norm_rms_eps", (config["rms_norm_eps"],)),
            ("add_rope_freq_base", (rope_theta(config),)),
            ("add_rope_dimension_count", (head_dim,)),
            ("add_vocab_size", (config["vocab_size"],))]
    if head_dim != config["hidden_size"] // heads:
        keys += [("add_key_length", (head_dim,)), ("add_value_length", (head_dim,))]
    return keys


def rope_scaling(config: dict) -> dict:
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def rope_freqs(model) -> torch.Tensor | None:
    """Llama 3.1/3.2's `llama3` rope scaling as llama.cpp reads it: per-frequency divisors
    (`rope_freqs.weight`), here the ratio of transformers' own unscaled and scaled inverse frequencies."""
    if rope_scaling(model.config.to_dict()).get("rope_type") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rotary = model.model.rotary_emb
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    default, _ = rotary.compute_default_rope_parameters(model.config, "cpu")
    return (default / scaled).float()


def permute_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """A llama query/key projection's rows from HF's rotate-half order to llama.cpp's adjacent pairs
    (convert_hf_to_gguf.py's permute); qwen2 keeps rotate-half (llama.cpp's NEOX rope)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def stock_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for a llama or qwen2 model, as convert_hf_to_gguf.py names them."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads

    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for part in ("q", "k", "v"):
        names[f"self_attn.{part}_proj.weight"] = f"attn_{part}.weight"
        names[f"self_attn.{part}_proj.bias"] = f"attn_{part}.bias"
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    out = [("token_embd.weight", state["model.embed_tokens.weight"]), ("output_norm.weight", state["model.norm.weight"])]
    if not config.tie_word_embeddings:
        out.append(("output.weight", state["lm_head.weight"]))
    factors = rope_freqs(model)
    if factors is not None:
        out.append(("rope_freqs.weight", factors))
    for name, tensor in state.items():
        if not name.startswith("model.layers."):
            continue
        index, local = name[len("model.layers."):].split(".", 1)
        if local not in names:
            raise ExportError(f"no llama.cpp name for {name}")
        if config.model_type == "llama" and local.startswith(("self_attn.q_proj", "self_attn.k_proj")):
            tensor = permute_rope_rows(tensor, heads if "q_proj" in local else kv_heads)
        out.append((f"blk.{index}.{names[local]}", tensor))
    return out


def pre_tokenizer(tokenizer: dict) -> str:
    """The llama.cpp pre-tokenizer that splits like this tokenizer.json, or ExportError."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    byte_bpe = (tokenizer.get("model") or {}).get("type") == "BPE" and len(steps) == 2 \
        and steps[1].get("type") == "ByteLevel"
    if byte_bpe and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return PRE_TOKENIZER
    if byte_bpe and steps[0].get("type") == "Split" and not steps[1].get("use_regex", True) \
            and (steps[0].get("pattern") or {}).get("Regex") in STOCK_SPLITS:
        return STOCK_SPLITS[steps[0]["pattern"]["Regex"]]
    raise ExportError("the tokenizer is neither ours (single digits, then byte-level BPE) nor a byte-level BPE with "
                      "Qwen2's or Llama 3's split: llama.cpp picks its pre-tokenizer by name and this exporter maps "
                      f"only those ({PRE_TOKENIZER!r}, {', '.join(map(repr, STOCK_SPLITS.values()))}); use llama.cpp's "
                      "convert_hf_to_gguf.py for other tokenizers")


def check_exportable(config: dict, tokenizer: dict) -> str:
    """Refuse what llama.cpp would misread; returns the llama.cpp pre-tokenizer name."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(f"model_type {model_type!r}: this exporter writes {', '.join(ARCHITECTURES)} models; for "
                          "another architecture llama.cpp supports, use its convert_hf_to_gguf.py")
    pre = pre_tokenizer(tokenizer)
    scaling = rope_scaling(config)
    rope = scaling.get("rope_type", scaling.get("type", "default"))
    if model_type != "deepseek_v3":
        if rope not in ("default", None) and not (model_type == "llama" and rope == "llama3"):
            raise ExportError(f"rope scaling {rope!r} on {model_type} is not exported (llama3 on llama is)")
        if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or []):
            raise ExportError(f"{model_type} with sliding-window attention is not exported")
        if model_type == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
            raise ExportError("llama with attention or MLP biases is not exported (llama.cpp's llama reads none)")
        return pre
    if not config.get("rope_interleave", True):
        raise ExportError("rope_interleave = false: llama.cpp's deepseek2 rotates adjacent pairs (DeepSeek's "
                          "layout); exporting the other layout needs the rope rows permuted, which is not done")
    if rope not in ("default", None):
        raise ExportError(f"rope scaling {rope!r} is not exported (untested)")
    if config["num_hidden_layers"] in (26, 27) and config.get("q_lora_rank"):
        raise ExportError(f"{config['num_hidden_layers']} layers with q_lora_rank = {config['q_lora_rank']}: llama.cpp "
                          "takes 26/27-layer deepseek2 models for DeepSeek-V2-Lite, whose queries have no low-rank "
                          "projection, and would not load it")
    return pre


def tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for the model's weights in llama.cpp's deepseek2 layout; MTP dropped."""
    config, out = model.config, []
    heads, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_a_proj.weight": "attn_q_a.weight",
             "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight", "self_attn.q_b_proj.weight": "attn_q_b.weight",
             "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
             "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
             "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
             "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
             "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
             "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
             "mlp.experts.down_proj": "ffn_down_exps.weight"}
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    out += [("token_embd.weight", state["model.embed_tokens.weight"]), ("output_norm.weight", state["model.norm.weight"]),
            ("output.weight", state["lm_head.weight"])]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for name, tensor in state.items():
            if not name.startswith(prefix):
                continue
            local = name[len(prefix):]
            if local == "self_attn.kv_b_proj.weight":
                kv_b = tensor.view(heads, nope + v, -1)                           # [h, nope+v, kv_lora_rank]
                k_b, v_b = kv_b.split([nope, v], dim=1)
                out += [(f"blk.{i}.attn_k_b.weight", k_b.transpose(1, 2).contiguous()), (f"blk.{i}.attn_v_b.weight", v_b)]
            elif local == "mlp.experts.gate_up_proj":                               # [E, 2*inter, H]
                gate, up = tensor.chunk(2, dim=1)
                out += [(f"blk.{i}.ffn_gate_exps.weight", gate.contiguous()), (f"blk.{i}.ffn_up_exps.weight", up.contiguous())]
            elif local in names:
                out.append((f"blk.{i}.{names[local]}", tensor))
            else:
                raise ExportError(f"no llama.cpp name for {name}")
    return out


def encoded(name: str, tensor: torch.Tensor, kind: str):
    """(numpy data, GGML type): weights matrices in `kind`; norms, biases and the router stay F32."""
    import gguf

    data = tensor.numpy().astype(np.float32)
    keep_f32 = data.ndim < 2 or name.endswith(("ffn_gate_inp.weight", "exp_probs_b.bias")) or kind == "f32"
    if keep_f32:
        return data, gguf.GGMLQuantizationType.F32
    if kind == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    if kind == "q8_0" and data.shape[-1] % 32:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16  # Q8_0 blocks need rows of 32s
    return gguf.quants.quantize(data, qtype), qtype


def add_tokenizer(writer, tokenizer: dict, tokenizer_config: dict, vocab_size: int, pre: str = PRE_TOKENIZER,
                  add_bos: bool = False) -> None:
    """The vocabulary, merges, special ids and chat template; `pre` names llama.cpp's pre-tokenizer and
    `add_bos` says whether the tokenizer prepends its BOS (ours does not: prompts start with the system
    text; Llama 3's does)."""
    import gguf

    vocab = tokenizer["model"]["vocab"]
    added = {token["id"]: token for token in tokenizer.get("added_tokens", [])}
    by_id = {index: text for text, index in vocab.items()}
    by_id.update({index: token["content"] for index, token in added.items()})
    tokens, types = [], []
    for index in range(vocab_size):
        if index in added:
            tokens.append(added[index]["content"])
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {text: index for index, text in enumerate(tokens)}
    for key, add in (("eos_token", writer.add_eos_token_id), ("pad_token", writer.add_pad_token_id),
                     ("bos_token", writer.add_bos_token_id)):
        token = tokenizer_config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in ids:
            add(ids[token])
    writer.add_add_bos_token(add_bos)
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def export_gguf(checkpoint: str | Path, out: str | Path, kind: str = "f32") -> Path:
    """Write `checkpoint` (our DeepSeek-V3 format, fp32/bf16 or FP8, or a llama / qwen2 model) as GGUF
    `out`, atomically, with `out`.sha256 beside it. Returns `out`."""
    import gguf
    from transformers import AutoTokenizer

    from r1pipeline import policy

    if kind not in TYPES:
        raise ExportError(f"--type {kind!r}; allowed: {', '.join(TYPES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    config = _json(checkpoint / "config.json")
    tokenizer = _json(checkpoint / "tokenizer.json")
    pre = check_exportable(config, tokenizer)
    tokenizer_config = _json(checkpoint / "tokenizer_config.json")
    template = checkpoint / "chat_template.jinja"
    if template.is_file():
        tokenizer_config.setdefault("chat_template", template.read_text())
    hf_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    add_bos = hf_tokenizer.bos_token_id is not None and hf_tokenizer("1")["input_ids"][:1] == [hf_tokenizer.bos_token_id]
    model = policy.load_pretrained(str(checkpoint), "float32")   # FP8 dequantised
    arch = ARCHITECTURES[config["model_type"]]
    keys, weights = (hparams(config), tensors(model)) if arch == "deepseek2" else (stock_hparams(config),
                                                                                  stock_tensors(model))
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    writer.add_name(checkpoint.parent.name if checkpoint.name == "final" else checkpoint.name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    for method, args in keys:
        getattr(writer, method)(*args)
    add_tokenizer(writer, tokenizer, tokenizer_config, config["vocab_size"], pre, add_bos)
    for name, tensor in weights:
        data, qtype = encoded(name, tensor, kind)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    digest = hashlib.sha256(partial.read_bytes()).hexdigest()
    os.replace(partial, out)
    out.with_name(out.name + ".sha256").write_text(f"{digest}  {out.name}\n")
    return out


MODELFILE = """# Ollama (untested here: no Ollama binary on the build machines). Ollama's Go engine hard-codes
# DeepSeek-V3's own pre-tokenizer for deepseek2 models, which splits numbers into groups of up to three
# digits where ours splits single digits: if `ollama run` answers oddly, serve the GGUF with llama.cpp.
FROM ./{gguf}
TEMPLATE \"\"\"{{{{ if .System }}}}{{{{ .System }}}}
{{{{ end }}}}{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}User: {{{{ .Content }}}}
{{{{ else if eq .Role "assistant" }}}}Assistant:{{{{ .Content }}}}{eos}{{{{ end }}}}{{{{ end }}}}Assistant:\"\"\"
PARAMETER stop "{eos}"
PARAMETER temperature 0.6
PARAMETER top_p 0.95
"""
CHAT_MODELFILE = """# Ollama (untested here: no Ollama binary on the build machines). This run used its model's chat template
# (data.prompt_format: chat), which the GGUF carries; Ollama maps known templates from it.
FROM ./{gguf}
PARAMETER temperature 0.6
PARAMETER top_p 0.95
"""


def modelfile(checkpoint: Path, gguf_name: str) -> str:
    """The Ollama Modelfile: R1's plain template (data.prompt_format r1, the default), or the model's own."""
    config = _json(checkpoint.parent / "stage_config.json").get("config") or {}
    if (config.get("data") or {}).get("prompt_format") == "chat":
        return CHAT_MODELFILE.format(gguf=gguf_name)
    return MODELFILE.format(gguf=gguf_name, eos=_json(checkpoint / "tokenizer_config.json").get("eos_token") or "")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m r1pipeline export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--run", default="default")
    parser.add_argument("--stage", default=None, help="a stage name (default: the last finished one)")
    parser.add_argument("--gguf", action="store_true", required=True, help="write GGUF (the one format so far)")
    parser.add_argument("--type", default="f32", choices=TYPES, help="tensor type of the weight matrices")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from r1pipeline.serve import checkpoint_of

    args = parse_args(sys.argv[1:] if argv is None else argv)
    checkpoint = checkpoint_of(args.runs_dir, args.run, args.stage)
    out = checkpoint.parent / "export" / f"{args.run}-{checkpoint.parent.name}-{args.type}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_gguf(checkpoint, out, args.type)
    except ExportError as exc:
        print(f"r1pipeline export: error: {exc}", file=sys.stderr)
        return 2
    (out.parent / "Modelfile").write_text(modelfile(checkpoint, out.name))
    print(f"[r1pipeline] {out} ({out.stat().st_size / 2**20:.1f} MiB, sha256 in {out.name}.sha256); "
          f"llama.cpp: llama-server -m {out} --jinja; Ollama: ollama create NAME -f {out.parent / 'Modelfile'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
