"""The DeepSeek-V3 building blocks: MLA attention, the sigmoid Gate, grouped-GEMM routed Experts,
DeepSeekMoE, the dense MLP and the decoder Block. State-dict names are transformers' DeepseekV3 names.

Shapes: B batch, S new tokens, T cached + new tokens, H hidden_size, h heads, E routed experts,
K experts per token, N = B*S tokens.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .config import R1MoEConfig
from .fp8 import (fake_blocks, fp8_grouped_linear, fp8_linear, frozen_fp8_grouped_linear, frozen_fp8_linear,
                  grouped_mm)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)  # fp32 statistics


class Linear(nn.Linear):
    """A bias-free linear layer whose three GEMMs run in block-wise FP8 when `fp8` is set (V3 §3.3);
    the weight itself stays in the model's (master) precision."""

    def __init__(self, in_features: int, out_features: int, fp8: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = fp8
        self.rounded: dict[str, torch.Tensor] | None = None  # fp8_compute's frozen FP8 copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (rounded := frozen_copy(self, "weight")) is not None:
            return frozen_fp8_linear(x, rounded)
        return fp8_linear(x, self.weight) if self.fp8 else F.linear(x, self.weight)


def frozen_copy(layer: nn.Module, name: str) -> torch.Tensor | None:
    """fp8_compute's rounded copy of the layer's weight `name`, where it has one and no gradient is wanted."""
    return None if layer.rounded is None or torch.is_grad_enabled() else layer.rounded.get(name)


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a linear layer computes with: a LoRA-wrapped one (peft's lora.Linear, unmerged) adds
    its active adapters' deltas, which its `.weight` (the frozen base weight) leaves out. An FP8 layer
    computes with its weight rounded through 128x128-block e4m3, as an FP8 engine dequantises it for
    the absorbed MLA decode (vLLM's `split_kv_b_proj`)."""
    base = getattr(layer, "base_layer", layer)
    if not getattr(base, "fp8", False):
        weight = layer.weight
    else:
        weight = base.rounded["weight"] if base.rounded is not None else fake_blocks(base.weight)
    if hasattr(layer, "get_delta_weight") and not layer.merged and not layer.disable_adapters:
        for name in layer.active_adapters:
            if name in layer.lora_A:
                weight = weight + layer.get_delta_weight(name)
    return weight


def _whole_cpu_tensor(p: torch.Tensor) -> bool:
    return type(p.data) is torch.Tensor and not hasattr(p, "ds_id") and not p.is_cuda  # ds_id: DeepSpeed's


@contextlib.contextmanager
def fp8_compute(model: nn.Module):
    """Within it, every Linear and routed-expert GEMM of `model` runs in block FP8 (weights quantised in
    128x128 blocks, activations in 1x128 tiles, from the unchanged master weights), as an FP8 rollout
    engine computes; the router (Gate) and the output head keep full precision.

    The weights are rounded once, on entry, as an engine holds its FP8 copy: without gradients (a
    rollout) the layers compute with that copy, not re-quantising every weight at every decoding step
    (on CPU, where the FP8 GEMM is an emulation; on a GPU the real FP8 kernel quantises per call). A
    sharded weight (FSDP2's DTensor, a ZeRO-3 partition) is whole only inside its module's forward, so
    it is rounded there, per call, as before."""
    layers = [m for m in model.modules() if isinstance(m, (Linear, Experts)) and not m.fp8]
    for layer in layers:
        layer.fp8 = True
        layer.rounded = {name: fake_blocks(p.detach()) for name, p in layer.named_parameters(recurse=False)
                         if _whole_cpu_tensor(p)} or None
    try:
        yield
    finally:
        for layer in layers:
            layer.fp8, layer.rounded = False, None


class RotaryEmbedding(nn.Module):
    """cos/sin of the decoupled RoPE (qk_rope_head_dim wide); YaRN etc. through transformers' tables."""

    def __init__(self, config: R1MoEConfig):
        super().__init__()
        rope = config.rope_parameters
        dim = config.qk_rope_head_dim
        if rope["rope_type"] == "default":
            inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.attention_factor = 1.0
        else:
            inv_freq, self.attention_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, S, rope/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, heads, S, rope] by cos/sin [B, S, rope/2]. DeepSeek's weights pair adjacent dims
    (x0, x1), (x2, x3)... (`rope_interleave`); the output lists the pairs' first then second halves,
    as transformers does — q and k get the same permutation, so q·k is unchanged."""
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def softmax_scale(config: R1MoEConfig) -> float:
    """(qk_nope + qk_rope)^-0.5, times YaRN's mscale² when the context is extended."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope_parameters
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim") and rope["factor"] > 1:
        scale *= (0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0) ** 2
    return scale


# Past this many attention scores (B·h·S·T, 32 MB in fp32) the CPU's fused kernel mostly beat its math
# path (forward + backward 1.16-1.74x at 8-92M scores, 4 and 16 heads; one shape just past it, 32 x 4
# heads x 256², 0.92x); below it the two were level within 8%.
FUSED_ATTENTION_SCORES = 1 << 23


def attend(q, k, v, mask, scale):
    """SDPA of q, k [B, h, S|T, d] and v [B, h, T, d_v]. MLA's values are narrower than its queries and
    keys (v_head_dim < nope + rope), and the CPU's fused (flash) kernel needs one head dim: without it
    SDPA runs its math path, which materialises every score. Where the scores are many, v is zero-padded
    to d (the padded outputs are zeros, cut off; gradients unchanged) so that the fused kernel runs."""
    B, h, S, d = q.shape
    T, d_v = k.shape[2], v.shape[-1]
    pad = q.device.type == "cpu" and d_v < d and B * h * S * T >= FUSED_ATTENTION_SCORES
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, d - d_v)) if pad else v, attn_mask=mask,
                                         is_causal=mask is None and S > 1, scale=scale)
    return out[..., :d_v] if pad else out


class MLA(nn.Module):
    """Multi-head Latent Attention (V2 §2.1): queries through a q_lora_rank bottleneck, keys and values
    through one kv_lora_rank latent, plus a decoupled RoPE key shared by all heads. The KV cache holds
    only the normed latent and the rotated RoPE key, kv_lora_rank + qk_rope_head_dim values per token."""

    def __init__(self, config: R1MoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.nope, self.rope, self.v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.interleave = bool(config.rope_interleave)
        self.scale = softmax_scale(config)
        hidden, qk, fp8 = config.hidden_size, self.nope + self.rope, config.fp8
        if config.q_lora_rank is None:
            self.q_proj = Linear(hidden, self.heads * qk, fp8)
        else:
            self.q_a_proj = Linear(hidden, config.q_lora_rank, fp8)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(config.q_lora_rank, self.heads * qk, fp8)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.rope, fp8)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.heads * (self.nope + self.v), fp8)
        self.o_proj = Linear(self.heads * self.v, hidden, fp8)

    def forward(self, x, rope, mask, cache=None):
        B, S, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, self.heads, -1).transpose(1, 2)                    # [B, h, S, nope+rope]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)                    # [B, 1, S, kv_lora_rank]
        q_pe = apply_rope(q_pe, *rope, self.interleave)
        k_pe = apply_rope(k_pe.unsqueeze(1), *rope, self.interleave)         # [B, 1, S, rope]
        if cache is not None:
            latent, k_pe = cache.update(latent, k_pe, self.layer_idx)        # [B, 1, T, ...]
            if S == 1 and not torch.is_grad_enabled():
                return self.o_proj(self.absorbed_decode(q_nope, q_pe, latent, k_pe, mask).reshape(B, 1, -1))
        T = latent.shape[2]
        kv = self.kv_b_proj(latent).view(B, T, self.heads, -1).transpose(1, 2)  # [B, h, T, nope+v]
        k_nope, v = kv.split([self.nope, self.v], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, self.heads, T, self.rope)], dim=-1)  # [B, h, T, nope+rope]
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = attend(q, k, v, mask, self.scale)                              # [B, h, S, v]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))           # [B, S, H]

    def absorbed_decode(self, q_nope, q_pe, latent, k_pe, mask):
        """One decoding step attending in the latent space (V2 §2.1.2, "absorbed" MLA): kv_b_proj's
        key half is folded into the query and its value half applied after attention, so the cached
        latent is never expanded to per-head keys and values, which every step would otherwise redo
        for the whole prefix. Same result as the expanded path; inference only."""
        B, h, _, _ = q_nope.shape
        T = latent.shape[2]
        w = effective_weight(self.kv_b_proj).view(self.heads, self.nope + self.v, self.kv_lora_rank)
        w_k, w_v = w.split([self.nope, self.v], dim=1)                      # [h, nope|v, r]
        q_latent = torch.einsum("bhsn,hnr->bhsr", q_nope, w_k)              # [B, h, 1, r]
        # Every head reads the one latent (and RoPE key), so the heads are the rows of one batched GEMM
        # per sequence: `[B, h, 1, r] @ [B, 1, r, T]` would broadcast, copying the cache once per head at
        # every step (70% of a 384-token rollout's time).
        latent, k_pe = latent[:, 0], k_pe[:, 0]                             # [B, T, r], [B, T, rope]
        scores = torch.baddbmm(torch.bmm(q_pe.reshape(B, h, -1), k_pe.transpose(1, 2)),
                               q_latent.reshape(B, h, -1), latent.transpose(1, 2)) * self.scale  # [B, h, T]
        if mask is not None:
            scores = scores.view(B, h, 1, T).masked_fill(~mask, float("-inf")).view(B, h, T)
        out_latent = torch.bmm(scores.softmax(dim=-1, dtype=torch.float32).to(latent.dtype), latent)  # [B, h, r]
        return torch.einsum("bhr,hvr->bhv", out_latent, w_v).unsqueeze(1)   # [B, 1, h, v]


class MLP(nn.Module):
    """SwiGLU: the dense FFN of the first layers, and the shared experts (one MLP of their total width)."""

    def __init__(self, hidden: int, inter: int, fp8: bool):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, fp8)
        self.up_proj = Linear(hidden, inter, fp8)
        self.down_proj = Linear(inter, hidden, fp8)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid router with aux-loss-free balancing (V3 §2.1.2). The fp32 correction bias steers which
    experts are selected, never the weights they get; `update_bias` moves it by γ against the load
    counted in training forwards since the last update."""

    def __init__(self, config: R1MoEConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group or 1, config.topk_group or 1
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts), persistent=False)
        self.recording = False  # r1pipeline.model.routing turns it on; the forward then keeps `recorded`
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids used, ids chosen freely)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the bias: γ = 1e-3 steps vanish in bf16 (V3 keeps it fp32).
        super()._apply(fn, recurse)
        self._buffers["e_score_correction_bias"] = self.e_score_correction_bias.float()
        self._buffers["expert_load"] = self.expert_load.float()
        return self

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None, forced: torch.Tensor | None = None):
        """(routing weights [N, K], expert ids [N, K], affinities [N, E]). `forced` [N, K] replays recorded
        expert ids (routing replay): a row of ids is used as given, a row of NO_ROUTE is routed here;
        either way the weights come from the live affinities, so the router keeps its gradient."""
        N, E = x.shape[0], self.weight.shape[0]
        scores = F.linear(x.float(), self.weight.float()).sigmoid()           # [N, E] affinities s
        choice = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            # Group-limited routing: a group scores by its two best experts; keep topk_group groups.
            grouped = choice.view(N, self.n_group, -1)                           # [N, G, E/G]
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices
            keep = torch.zeros(N, self.n_group, 1, dtype=torch.bool, device=x.device).scatter_(1, best[..., None], True)
            choice = grouped.masked_fill(~keep, float("-inf")).view(N, E)
        indices = free = choice.topk(self.top_k, dim=-1, sorted=False).indices  # [N, K]
        if forced is not None:
            indices = torch.where((forced >= 0).all(-1, keepdim=True), forced.long(), free)
        if self.recording:
            self.recorded = (indices, free)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.training:
            with torch.no_grad():
                chosen = indices if token_mask is None else indices[token_mask.reshape(-1)]
                self.expert_load += torch.bincount(chosen.flatten(), minlength=E).float()
        return weights * self.scaling, indices, scores

    @torch.no_grad()
    def update_bias(self, speed: float) -> float:
        """b_i += γ·sign(mean load − load_i); returns the load imbalance max/mean it corrected."""
        load = self.expert_load
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        imbalance = (load.max() / load.mean().clamp(min=1e-9)).item()
        if load.sum() > 0 and speed:
            self.e_score_correction_bias += speed * torch.sign(load.mean() - load)
        load.zero_()
        return imbalance


class Experts(nn.Module):
    """The fine-grained routed experts of one layer as stacked weights, computed with two grouped GEMMs
    over the expert-sorted (token, expert) pairs — no per-expert Python loop, no host sync."""

    def __init__(self, config: R1MoEConfig):
        super().__init__()
        E, H, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, H))   # [gate_proj; up_proj] per expert
        self.down_proj = nn.Parameter(torch.empty(E, H, inter))
        self.fp8 = config.fp8
        self.rounded: dict[str, torch.Tensor] | None = None  # fp8_compute's frozen FP8 copy

    def _gemm(self, x, name, offs):
        if (rounded := frozen_copy(self, name)) is not None:
            return frozen_fp8_grouped_linear(x, rounded, offs)
        weight = getattr(self, name)
        return fp8_grouped_linear(x, weight, offs) if self.fp8 else grouped_mm(x, weight.transpose(1, 2), offs=offs)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        N, K = indices.shape
        flat = indices.flatten()
        order = flat.argsort(stable=True)                                    # [N*K] pairs sorted by expert
        offs = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).cumsum(0).to(torch.int32)
        token = order // K
        h = self._gemm(x.index_select(0, token), "gate_up_proj", offs)       # [N*K, 2*inter]
        gate, up = h.chunk(2, dim=-1)
        # The routing weight scales the narrow activation, not the H-wide output (down_proj is linear).
        a = F.silu(gate) * up * weights.flatten()[order, None].to(h.dtype)   # [N*K, inter]
        y = self._gemm(a, "down_proj", offs)                                 # [N*K, H]
        return torch.zeros_like(x).index_add_(0, token, y)                   # [N, H]


class MoE(nn.Module):
    """DeepSeekMoE: shared experts for every token plus K routed experts of E, and the optional
    sequence-wise balance loss α Σ_i f_i P_i (V3 Eq. 17-20).

    A batch whose rows share a first stretch of tokens can compute it once (stages/sft.py): the forward
    over that prefix keeps its balance sums (`keep_prefix_sums`), and the forwards over the rows' rest
    add them to each row's (`prefix_sums`), so every row's loss counts its whole sequence."""

    def __init__(self, config: R1MoEConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.fp8)
        self.seq_aux_alpha = config.seq_aux_alpha
        self.keep_prefix_sums = False
        self.prefix_sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None, routing: torch.Tensor | None = None):
        B, S, H = x.shape
        flat = x.view(-1, H)                                                   # [N, H]
        forced = None if routing is None else routing.reshape(B * S, -1)       # [B, S, K] -> [N, K]
        weights, indices, scores = self.gate(flat, token_mask, forced)
        y = self.experts(flat, weights, indices).view(B, S, H) + self.shared_experts(x)
        aux = None
        if self.training and self.seq_aux_alpha:
            sums = self.balance_sums(scores.view(B, S, -1), indices.view(B, S, -1), token_mask)
            if self.keep_prefix_sums:
                self.prefix_sums = sums
            elif self.prefix_sums is not None:
                sums = tuple(mine + shared for mine, shared in zip(sums, self.prefix_sums))
            aux = self.balance_loss(*sums, K=indices.shape[-1])
        return y, aux

    @staticmethod
    def balance_sums(scores, indices, token_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sequence: how often each expert was chosen [B, E], the normalised affinities summed [B, E]
        (with their gradient), the tokens counted [B]."""
        B, S, E = scores.shape
        valid = torch.ones(B, S, device=scores.device) if token_mask is None else token_mask.float()
        chosen = torch.zeros_like(scores).scatter_(2, indices, 1.0) * valid[..., None]
        return chosen.sum(1), (scores / scores.sum(-1, keepdim=True) * valid[..., None]).sum(1), valid.sum(1)

    def balance_loss(self, chosen, affinity, tokens, K: int):
        E, tokens = chosen.shape[-1], tokens.clamp(min=1)[:, None]
        f = chosen * E / (K * tokens)                                             # [B, E]
        P = affinity / tokens
        return self.seq_aux_alpha * (f * P).sum(-1).mean()


class Block(GradientCheckpointingLayer):
    """Pre-norm decoder block: MLA then a dense MLP (first_k_dense_replace layers) or DeepSeekMoE."""

    def __init__(self, config: R1MoEConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        self.is_moe = layer_idx >= config.first_k_dense_replace
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size, config.fp8)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope=None, mask=None, past_key_values=None, token_mask=None, routing=None):
        # `routing` [B, S, K]: expert ids to replay in this layer (a keyword argument, so that gradient
        # checkpointing's recomputation replays them too).
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, past_key_values)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h), None
        h, aux = self.mlp(h, token_mask, routing)
        return x + h, aux
