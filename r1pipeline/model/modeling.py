"""R1MoEForCausalLM: the DeepSeek-V3 architecture as a transformers PreTrainedModel that trains.

Embedding -> num_hidden_layers Blocks -> RMSNorm -> untied head, plus D MTP modules used only for the
training loss. Checkpoints are read and written in the DeepSeek-V3 layout by checkpoint.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from . import checkpoint
from .config import R1MoEConfig
from .layers import Block, Experts, Gate, RMSNorm, RotaryEmbedding
from .routing import NO_ROUTE, routing_of


@dataclass
class R1MoEModelOutput(BaseModelOutputWithPast):
    aux_loss: torch.Tensor | None = None  # α-weighted sequence-wise balance loss, summed over MoE layers


@dataclass
class R1MoECausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # (1/D) Σ_k L_MTP^k, before the weight λ


class GrowingLayer(DynamicLayer):
    """transformers' DynamicLayer with storage that grows by doubling: each update writes the new tokens
    in place and returns views of the filled prefix, where DynamicLayer concatenates the whole prefix
    again at every token (75% of a 128 x 384-token rollout of the embedded default, once the absorbed
    decode stopped copying). A cropped cache keeps writing into its storage; a reordered batch
    (beam search) gets new storage. States that carry gradient are concatenated as DynamicLayer does:
    writing into storage that earlier views were saved from would break their backward."""

    _storage: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values) at their full capacity

    def update(self, key_states, value_states, *args, **kwargs):
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._storage = None
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        storage = self._storage
        if (storage is None or self.keys.data_ptr() != storage[0].data_ptr() or length + new > storage[0].shape[-2]
                or storage[0].shape[:-2] != key_states.shape[:-2]):
            capacity = max(2 * (length + new), 64)
            storage = tuple(states.new_empty(*states.shape[:-2], capacity, states.shape[-1])
                            for states in (key_states, value_states))
            if length:
                storage[0][..., :length, :] = self.keys
                storage[1][..., :length, :] = self.values
            self._storage = storage
        storage[0][..., length:length + new, :] = key_states
        storage[1][..., length:length + new, :] = value_states
        self.keys, self.values = storage[0][..., :length + new, :], storage[1][..., :length + new, :]
        return self.keys, self.values

    def keep_rows(self, index: torch.Tensor) -> None:
        """Only these rows of the batch from now on (their storage copied; the next update reallocates)."""
        if self.is_initialized:
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self._storage = None


class GrowingCache(DynamicCache):
    """A DynamicCache of GrowingLayers: what our model decodes with unless given another cache.

    While `generate` samples or searches greedily, `finished` ([B] bool, kept by `FinishedRows`) marks the
    rows that have ended; `decode_rows` then drops them from the storage once they are an eighth of it,
    and the decoding steps compute only the rows it holds (R1MoEForCausalLM.forward). transformers'
    `generate` keeps decoding every row to the longest one's end, a GRPO batch's finished rows included
    (half the row-steps of the embedded default's rollouts)."""

    FINISHED_SHARE = 1 / 8  # dropped from the storage once they are this much of it

    def __init__(self, config):
        super().__init__(config=config)
        self.layers = [GrowingLayer() for _ in self.layers]
        self.finished: torch.Tensor | None = None   # [B] over the whole batch
        self.rows: torch.Tensor | None = None       # the rows of the batch the storage holds (None: all)

    def decode_rows(self) -> torch.Tensor | None:
        """The rows of the batch the next decoding step computes, in the storage's order (None: all)."""
        if self.finished is None:
            return self.rows
        rows = self.rows if self.rows is not None else torch.arange(len(self.finished), device=self.finished.device)
        done = self.finished[rows]
        if bool(done.all()) or int(done.sum()) < max(1, len(rows) * self.FINISHED_SHARE):
            return self.rows
        keep = (~done).nonzero().squeeze(1)
        for layer in self.layers:
            layer.keep_rows(keep.to(layer.keys.device) if layer.is_initialized else keep)
        self.rows = rows[keep]
        return self.rows


class FinishedRows(StoppingCriteria):
    """A stopping criterion that stops no row: it tells `cache` (GrowingCache.finished) which rows have
    ended, one step after they sampled an EOS, so that the EOS itself is still fed through (its routes
    recorded). Rows that other criteria stop (stop strings) are decoded on: time, never a token."""

    def __init__(self, cache: GrowingCache, eos: torch.Tensor):
        self.cache, self.eos, self.ended = cache, eos, None

    def __call__(self, input_ids, scores, **kwargs):
        ended = torch.isin(input_ids[:, -1], self.eos.to(input_ids.device))
        if self.ended is not None:
            self.cache.finished = self.ended.clone()
            ended |= self.ended
        self.ended = ended
        return torch.zeros_like(ended)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def attention_mask_4d(attention_mask, q_len: int, kv_len: int) -> torch.Tensor | None:
    """Boolean [B, 1, S, T] mask: causal over the last q_len of kv_len positions, padding keys masked.
    None when SDPA's own causal mask is exact (no padding, no cached prefix)."""
    if q_len == kv_len and (attention_mask is None or bool(attention_mask.all())):
        return None
    device = attention_mask.device if attention_mask is not None else None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    mask = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]                  # [S, T]
    if attention_mask is not None:
        mask = mask[None] & attention_mask[:, None, -kv_len:].bool()                      # [B, S, T]
        # A left-padding query sees no key at all; letting it see itself keeps SDPA free of NaN.
        mask = mask | (q_pos[:, None] == torch.arange(kv_len, device=device)[None, :])
    return mask.view(-1, 1, q_len, kv_len) if mask.dim() == 3 else mask[None, None]


class R1MoEPreTrainedModel(PreTrainedModel):
    config_class = R1MoEConfig
    config: R1MoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Gate):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)


class R1MoEModel(R1MoEPreTrainedModel):
    def __init__(self, config: R1MoEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.routing_log: list | None = None  # routing.recording() sets a list
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, routed_experts=None, **kwargs) -> R1MoEModelOutput:
        """`routed_experts` [B, S, MoE layers, K]: expert ids to replay (routing.py; NO_ROUTE rows route
        freely). With a routing.recording() open, each call appends what its MoE layers chose."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds       # [B, S, H]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not (self.gradient_checkpointing and self.training):
            past_key_values = GrowingCache(self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        S = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=x.device)[None]
        mask = attention_mask_4d(attention_mask, S, past + S)
        token_mask = attention_mask[:, -S:].bool() if attention_mask is not None else None
        rope = self.rotary_emb(position_ids)
        aux, moe = None, 0
        for layer in self.layers:
            routing = None
            if routed_experts is not None and layer.is_moe:
                routing, moe = routed_experts[:, :, moe], moe + 1
            x, layer_aux = layer(x, rope=rope, mask=mask, past_key_values=past_key_values, token_mask=token_mask,
                                 routing=routing)
            aux = _add(aux, layer_aux)
        if self.routing_log is not None:
            self.routing_log.append(routing_of(self, x.shape[0], S))
        return R1MoEModelOutput(last_hidden_state=self.norm(x), past_key_values=past_key_values, aux_loss=aux)


class MTP(Block):
    """Multi-token prediction module k (V3 §2.2, Eq. 21-23): h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]),
    one more Block, then the shared head through this module's own final norm."""

    def __init__(self, config: R1MoEConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)  # kept high precision
        self.shared_head = nn.ModuleDict({"norm": RMSNorm(config.hidden_size, config.rms_norm_eps)})

    def forward(self, hidden, next_embeds, rope, mask, token_mask):
        # The module's own forward (not a helper method) so that wrappers hooked on calls, such as FSDP2
        # gathering this module's shards, see it.
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))  # [B, S-k, H]
        x, aux = super().forward(x, rope=rope, mask=mask, token_mask=token_mask)
        return self.shared_head["norm"](x), aux


class R1MoEForCausalLM(R1MoEPreTrainedModel, GenerationMixin):
    def __init__(self, config: R1MoEConfig):
        super().__init__(config)
        self.model = R1MoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        L = config.num_hidden_layers
        self.mtp = nn.ModuleList([MTP(config, L + k) for k in range(config.num_nextn_predict_layers)])
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate`'s default cache (a DynamicCache) as a GrowingCache; a cache the caller passes, or
        another `cache_implementation`, stays as asked."""
        prepared = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        self._decoding_cache = None
        if type(cache) is DynamicCache and generation_config.cache_implementation is None \
                and not getattr(cache, "_is_user_defined", False):
            model_kwargs["past_key_values"] = self._decoding_cache = GrowingCache(self.config)
        return prepared

    def _get_stopping_criteria(self, generation_config, stopping_criteria, *args, **kwargs):
        """transformers' criteria, plus `FinishedRows` on the cache made above when `generate` samples or
        searches greedily (one sequence per row, none of the cache returned to the caller)."""
        criteria = super()._get_stopping_criteria(generation_config, stopping_criteria, *args, **kwargs)
        cache, self._decoding_cache = getattr(self, "_decoding_cache", None), None
        if (cache is not None and generation_config._eos_token_tensor is not None
                and (generation_config.num_beams or 1) == 1 and not generation_config.is_assistant
                and not generation_config.return_dict_in_generate and generation_config.assistant_early_exit is None
                and generation_config.prompt_lookup_num_tokens is None):
            criteria.append(FinishedRows(cache, generation_config._eos_token_tensor))
        return criteria

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, routed_experts=None,
                **kwargs) -> R1MoECausalLMOutput:
        rows = None
        if (isinstance(past_key_values, GrowingCache) and input_ids is not None and input_ids.shape[1] == 1
                and labels is None and routed_experts is None and not torch.is_grad_enabled()):
            rows = past_key_values.decode_rows()  # a decoding step: the rows that have not finished
        if rows is not None:
            batch = input_ids.shape[0]
            input_ids, attention_mask, position_ids = (None if t is None or t.shape[0] != batch else t[rows]
                                                       for t in (input_ids, attention_mask, position_ids))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         routed_experts=routed_experts)
        hidden = out.last_hidden_state                                                      # [B, S, H]
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])                                             # [B, S', V]
        if rows is not None:  # back to the whole batch: zeros (and no routes) for the finished rows
            logits = logits.new_zeros(batch, *logits.shape[1:]).index_copy_(0, rows, logits)
            log = self.model.routing_log
            if log:
                log[-1] = tuple(torch.full((batch, *r.shape[1:]), NO_ROUTE, dtype=r.dtype, device=r.device)
                                .index_copy_(0, rows.to(r.device), r) for r in log[-1])
        loss = mtp_loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if self.training and len(self.mtp) and input_ids is not None:
                mtp_loss, mtp_aux = self.mtp_losses(hidden, input_ids, labels, attention_mask, position_ids)
                loss = loss + self.config.mtp_loss_weight * mtp_loss
                out.aux_loss = _add(out.aux_loss, mtp_aux)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
        return R1MoECausalLMOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                   aux_loss=out.aux_loss, mtp_loss=mtp_loss)

    def mtp_losses(self, hidden, input_ids, labels, attention_mask, position_ids, num_items=None):
        """(1/D) Σ_k CE(P^k_i, t_{i+k+1}): module k sees positions i < S-k. CE is the mean over this batch's
        targets, or with `num_items` (one count per k) their sum over that count, as the main loss is
        normalised under gradient accumulation and data parallelism (`mtp_target_counts`)."""
        S = input_ids.shape[1]
        embeds = self.model.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device)[None]
        total, aux = 0.0, None
        for k, module in enumerate(self.mtp, start=1):
            n = S - k
            token_mask = attention_mask[:, :n].bool() if attention_mask is not None else None
            mask = attention_mask_4d(attention_mask[:, :n] if attention_mask is not None else None, n, n)
            rope = self.model.rotary_emb(position_ids[:, :n])
            hidden, layer_aux = module(hidden[:, :n], embeds[:, k:], rope, mask, token_mask)
            # labels[:, k:] shifted once more inside the loss: position i predicts t_{i+k+1}.
            total = total + self.loss_function(logits=self.lm_head(hidden), labels=labels[:, k:],
                                               vocab_size=self.config.vocab_size,
                                               num_items_in_batch=None if num_items is None else num_items[k - 1])
            aux = _add(aux, layer_aux)
        return total / len(self.mtp), aux

    def mtp_target_counts(self, labels: torch.Tensor) -> torch.Tensor:
        """[D]: the targets MTP module k is scored on in a batch with these labels (labels[:, k+1:] that
        are not -100), the counterpart of the main loss's `num_items_in_batch`."""
        return torch.stack([(labels[:, k + 1:] != -100).sum() for k in range(1, len(self.mtp) + 1)])

    def update_routing_bias(self) -> float:
        """After each optimizer step: move every layer's correction bias by γ·sign(mean load − load)
        (no-op when freeze_routing_bias or γ = 0) and reset the load counts. Returns the largest
        max/mean expert-load ratio seen since the previous call (1.0 is perfect balance)."""
        frozen = self.config.freeze_routing_bias
        speed = 0.0 if frozen else self.config.bias_update_speed
        ratios = [m.update_bias(speed) for m in self.modules() if isinstance(m, Gate)]
        return max(ratios, default=1.0)

    def save_pretrained(self, save_directory, state_dict=None, is_main_process=True, max_shard_size="5GB", **kwargs):
        """Write the DeepSeek-V3 checkpoint layout (checkpoint.py); extra Trainer kwargs are ignored."""
        if is_main_process:
            checkpoint.save(self, save_directory, state_dict=state_dict, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, dtype=None, **kwargs):
        """Load a checkpoint in the DeepSeek-V3 layout, written by this class, by transformers'
        DeepseekV3ForCausalLM, or by DeepSeek (FP8 weights are dequantised)."""
        return checkpoint.load(cls, pretrained_model_name_or_path, config=config, dtype=dtype)

    def vllm_weights(self, fp8: bool | None = None, include_mtp: bool = False):
        """(name, tensor) in checkpoint format for vLLM's `load_weights` (see checkpoint.checkpoint_tensors);
        under FSDP2 every rank calls it (the shards are gathered)."""
        from r1pipeline.sharding import whole_state_dict

        return checkpoint.checkpoint_tensors(self, fp8=self.config.fp8 if fp8 is None else fp8, include_mtp=include_mtp,
                                             state_dict=whole_state_dict(self))


__all__ = ["R1MoEForCausalLM", "R1MoEModel", "R1MoEPreTrainedModel", "attention_mask_4d"]
