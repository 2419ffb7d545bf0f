"""R1MoEConfig: transformers' DeepseekV3Config field names plus the training-only knobs.

Architecture fields (the DeepSeek-V3 names, see transformers' DeepseekV3Config):
    vocab_size               tokens in the embedding and the untied output head
    hidden_size              model width d
    intermediate_size        width of the dense SwiGLU MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size    width of one fine-grained (routed or shared) expert
    num_hidden_layers        decoder blocks; the MTP modules come after them (checkpoint layer index L+k)
    first_k_dense_replace    the first k blocks use a dense MLP, the rest DeepSeekMoE
    num_attention_heads      MLA heads (num_key_value_heads must equal it: MLA has no GQA)
    q_lora_rank              query compression rank d_c' (None: one full-rank q_proj)
    kv_lora_rank             key/value latent rank d_c, the per-token KV cache width
    qk_nope_head_dim         per-head query/key width without RoPE
    qk_rope_head_dim         decoupled RoPE width (shared by all heads on the key side)
    v_head_dim               per-head value width
    n_routed_experts         routed experts per MoE layer
    num_experts_per_tok      routed experts per token K_r
    n_shared_experts         shared experts (one MLP of width n_shared_experts * moe_intermediate_size)
    n_group, topk_group      group-limited routing: experts split in n_group groups, a token may use topk_group
    norm_topk_prob           renormalise the K_r selected sigmoid affinities to sum 1
    routed_scaling_factor    multiplies the routed output (2.5 in V3)
    num_nextn_predict_layers MTP depth D (alias num_mtp_layers)
    rope_parameters, rope_interleave, max_position_embeddings, rms_norm_eps, initializer_range: as in V3
    topk_method, scoring_func, moe_layer_freq: fixed to V3's values; written to config.json for vLLM

Training extras (ignored by transformers and vLLM, kept in config.json):
    bias_update_speed        γ: routing-bias step per optimizer step (V3 §2.1.2; 1e-3, 0 to stop)
    freeze_routing_bias      True: update_routing_bias() leaves the bias unchanged (e.g. during RL)
    seq_aux_alpha            α: weight of the sequence-wise balance loss (V3 Eq. 17-20; 1e-4, 0 off)
    mtp_loss_weight          λ: weight of the MTP loss, (λ/D) Σ_k L_MTP^k (V3 §2.2; 0.3 then 0.1)
    fp8                      block-wise FP8 e4m3 GEMMs in the linear layers (V3 §3.3), FP8 checkpoints
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import DeepseekV3Config

FP8_BLOCK = 128


@strict
class R1MoEConfig(DeepseekV3Config):
    # Own type name for the Auto classes; checkpoints are written as `deepseek_v3` (checkpoint.py).
    model_type = "r1_moe"

    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    moe_layer_freq: int = 1
    bias_update_speed: float = 1e-3
    freeze_routing_bias: bool = False
    seq_aux_alpha: float = 1e-4
    mtp_loss_weight: float = 0.3
    fp8: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise early on a configuration this model (or vLLM's DeepSeek-V3 loader) cannot run."""
        fixed = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1, "hidden_act": "silu"}
        for name, value in fixed.items():
            if getattr(self, name) != value:
                raise ValueError(f"{name}={getattr(self, name)!r}: only {value!r} is implemented")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads}: MLA needs it equal to "
                             f"num_attention_heads={self.num_attention_heads}")
        experts, groups = self.n_routed_experts, self.n_group or 1
        if experts % groups or experts // groups < 2:
            raise ValueError(f"n_group={groups} must divide n_routed_experts={experts} into groups of >= 2 experts")
        if not 1 <= (self.topk_group or 1) <= groups or (self.topk_group or 1) * experts // groups < self.num_experts_per_tok:
            raise ValueError(f"topk_group={self.topk_group} groups of {experts // groups} experts cannot hold "
                             f"num_experts_per_tok={self.num_experts_per_tok}")
        if self.fp8:
            bad = {name: dim for name, dim in self.fp8_dims().items() if dim % FP8_BLOCK}
            if bad:
                raise ValueError(f"fp8=True needs every FP8 weight dimension to be a multiple of {FP8_BLOCK} "
                                 f"(transformers and vLLM load no other), got {bad}")

    def fp8_dims(self) -> dict[str, int]:
        """The dimensions of every weight stored in FP8 (reference §6.2 'Dimension rule')."""
        heads = self.num_attention_heads
        dims = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "kv_lora_rank + qk_rope_head_dim": self.kv_lora_rank + self.qk_rope_head_dim,
            "heads * qk_head_dim": heads * (self.qk_nope_head_dim + self.qk_rope_head_dim),
            "heads * (qk_nope_head_dim + v_head_dim)": heads * (self.qk_nope_head_dim + self.v_head_dim),
            "heads * v_head_dim": heads * self.v_head_dim,
        }
        if self.q_lora_rank is not None:
            dims["q_lora_rank"] = self.q_lora_rank
        return dims


# Presets use the DeepseekV3Config field names; vocab_size and special tokens come from the tokenizer.
PRESETS: dict[str, dict] = {
    # CPU tests and the embedded default: ~3M parameters, every FP8 dimension a multiple of 128 so the
    # FP8 checkpoint loads in transformers (CPU dequantisation) and vLLM (reference §6.3). The MLA latent
    # plus RoPE is 128 wide, which vLLM serves with TRITON_MLA on GPU; its CPU build needs "tiny-vllm".
    "tiny": dict(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=2, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        max_position_embeddings=512, tie_word_embeddings=False,
    ),
    # The tiny preset at the one MLA shape vLLM's CPU build serves (kv_lora_rank + qk_rope_head_dim =
    # 576): the vLLM tests, and the embedded default with a vLLM rollout engine on CPU.
    "tiny-vllm": dict(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=2, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=128, kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        max_position_embeddings=512, tie_word_embeddings=False,
    ),
    # Real size, documented, never instantiated in tests: DeepSeek-V2-Lite's 16B shape (27 layers,
    # 64 routed experts top-6, 2 shared) with V3's sigmoid/bias routing and an MTP module.
    "v2-lite-16b": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1,
        num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, n_shared_experts=2,
        routed_scaling_factor=1.0, num_nextn_predict_layers=1,
        max_position_embeddings=163840, tie_word_embeddings=False,
    ),
}

# The distillation student of the embedded default (stage 5, R1-Distill): the tiny preset's attention
# and dense FFN in every layer, no routed experts, no MTP module.
PRESETS["tiny-dense"] = {**PRESETS["tiny"], "first_k_dense_replace": 2, "num_nextn_predict_layers": 0}
