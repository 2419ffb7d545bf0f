"""What the RL stages' rollouts carry beyond TRL's: the sampling policy's own per-token logprobs on the
transformers `generate` path, the experts each token was routed to (MoE routing replay, R2/R3), FP8
rollouts, and the train/rollout mismatch measured every step.

TRL's GRPOTrainer knows one rollout engine that can differ from the trainer, vLLM: only there does it
keep the sampling logprobs, compute the trainer's own ("old") logprobs of the batch, and correct the
difference by truncated importance sampling. Here the transformers path supplies the same sampling
logprobs (a logits processor reads them off while `generate` samples), so TRL's correction and its
`sampling/*` metrics run for it too, and the mismatch metrics below hold for every rollout engine:

    sampling/kl_k3               k3 estimate (r - 1 - log r, r = π_train / π_rollout) of the
                                 rollout–trainer KL, KL(π_rollout ‖ π_train), per sampled token
                                 (AReaL's "KL(train ‖ rollout)")
    sampling/abs_dlogp_mean      mean |log π_train − log π_rollout|
    sampling/frac_dlogp_gt_ln2   share of tokens whose probabilities differ by more than 2×
    sampling/is_clip_frac        share of tokens (sequences, in TRL's sequence modes) that the
                                 importance-sampling correction truncated or masked
    routing/router_mismatch      share of (token, MoE layer) whose expert set in the training forward
                                 differs from the rollout's (0 for replayed layers)
    routing/token_mismatch       share of tokens with such a difference in any layer
    routing/*_free               the same for the experts the training forward would have chosen
                                 itself (what replay removes)
    routing/bytes                size of the routes kept for the batch

On-policy (each batch trained on once, in the optimizer step that generated it: num_iterations = 1
and steps_per_generation dividing gradient_accumulation_steps, TRL's defaults), the trainer's logprobs
of a batch before its update are those of its training forward. There the mismatch, the routes the
trainer used and TRL's importance-sampling ratio are taken from that forward (detached) instead of a
separate no-grad pass over the batch: one forward fewer per step (12 GRPO steps of the embedded
default: 63.3 s with the pass, 55.0 s without, 54.6 s with no mismatch metrics at all; 2-core Intel
host). With gradient accumulation the metrics are then logged per micro-batch and averaged. The same
holds for vLLM's rollouts (`use_vllm`), where TRL runs that pass at every step whenever its
importance-sampling correction is on (its default): on-policy it is skipped there too.

Routing replay (`routing_replay`): r3 forces the rollout's experts in every training forward of the
batch; r2 records the first training forward's (the trainer's "old" logprobs pass) and replays them in
the later passes (num_iterations > 1, steps_per_generation > 1). Replayed experts get their routing
weights from the live gate, so the router still learns. Routes travel with the batch in TRL's rollout
buffer, which our checkpoints save, so a resumed run replays what the uninterrupted one would.

Every training-side forward (the loss's, TRL's old-logprob and reference passes) computes each distinct
prompt of the batch once, with a KV cache that the rows of its group attend to (`_shared_prefix`; a
GRPO group's G rows share one prompt), and runs the rows in groups of similar completion length, each
cut after its longest completion (`length_buckets`; rows are padded to the batch's longest completion,
~2x the mean on the embedded default). Neither changes a logprob, gradient, route or routing-bias load
count (float summation order aside; tests/test_routing.py); together they cut the "rest" of a GRPO
step of the embedded default (16 x 8 completions of up to 96 tokens) from 1.29 s to 0.79 s in
benchmarks/grpo_step.py (2-core AMD EPYC).

FP8 rollouts (`rollout_precision: fp8`): the rollout computes every linear layer in block FP8 from the
fp32 master weights (DeepSeek-V3's 128x128 weight blocks, 1x128 activation tiles; exact emulation on
CPU), with the router and the output head in full precision, the production setup of slime and verl;
TRL's token-level truncated importance sampling (C = 2) corrects the trainer for the difference. As an
FP8 engine does, the weights are rounded once per rollout and each decoding step attends in MLA's
absorbed form with kv_b_proj's rounded weight (vLLM's dequantised W_UK / W_UV; `fp8_compute`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from r1pipeline import policy
from r1pipeline.model import routing
from r1pipeline.model.layers import fp8_compute
from r1pipeline.pipeline import log
from r1pipeline.schema import key
from stages.common import unwrapped

REPLAY_MODES = ("none", "r2", "r3")
PRECISIONS = ("model", "fp8")
# vLLM 0.31 returns routed experts only from its Model Runner V2, which needs Triton: its CPU build cannot
# (tests/test_vllm_engine.py); the GPU path is not wired yet, nor an FP8 engine's weight sync.
VLLM_REFUSAL = ("routing_replay = {replay!r}, rollout_precision = {precision!r} with use_vllm: the vLLM rollout path "
                "carries no routed experts (vLLM 0.31 returns them only from its Model Runner V2, which its CPU build "
                "cannot start) and no FP8 rollout weights; set use_vllm=false, whose transformers rollouts do both")
# What one more forward over a group of rows costs, in tokens of the forward itself (length_buckets):
# kernel launches and Python per layer. In GRPO stage runs of the embedded default (7 steps of 16 x 8
# completions of up to 96 tokens, 2-core AMD EPYC, before prompts were shared) the steps' training part
# took 1.32 s in one forward, 1.07 / 1.10 / 1.11 s with 64 / 256 / 1024 here: flat over that range.
BUCKET_OVERHEAD_TOKENS = 256
FP8_IS_DEFAULTS = {"vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": 2.0}


@dataclasses.dataclass
class RolloutKeys:
    """Keys of the GRPO and align sections about rollouts (stages/rollouts.py)."""

    routing_replay: str = key("none", "MoE routing replay: none, r2 (replay the first training forward's experts in "
                                      "later passes over a batch) or r3 (replay the rollout's experts)",
                              check=lambda mode: mode in REPLAY_MODES, what="one of " + ", ".join(REPLAY_MODES))
    rollout_precision: str = key("model", "model (rollouts with the policy's weights) or fp8 (block-FP8 rollout "
                                          "weights, router and head in full precision, truncated importance sampling)",
                                 check=lambda p: p in PRECISIONS, what="one of " + ", ".join(PRECISIONS))
    mismatch_metrics: bool = key(True, "log the train/rollout mismatch every step (on the transformers path, from "
                                       "the training forward on-policy, else one no-grad forward of the batch)")


def trl_defaults(section: dict) -> dict:
    """GRPOConfig fields these keys imply, under the recipe's own: an FP8 rollout corrects per token."""
    return dict(FP8_IS_DEFAULTS) if section.get("rollout_precision") == "fp8" else {}


def loss_mask(batch: dict) -> torch.Tensor:
    """The completion tokens a GRPO batch's loss counts: its completion mask less tool output (TRL's)."""
    return batch["completion_mask"] * batch.get("tool_mask", 1)


def row_lengths(mask: torch.Tensor) -> torch.Tensor:
    """[B]: each row's last marked position of `mask` [B, S], plus one (0 for a row with none)."""
    return (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(-1)


def length_buckets(widths: list[int], prompt: int, max_rows: int, overhead: int | None) -> list[list[int]]:
    """Rows of a batch grouped for the training forward, whose cost grows with each group's rows x (prompt +
    its widest completion): sorted by completion width and cut into consecutive runs of at most `max_rows`
    that minimise the tokens computed plus `overhead` tokens' worth per forward (an exact dynamic program,
    O(rows x max_rows)). `overhead` None: the batch's own order in runs of `max_rows` (TRL's chunks)."""
    n = len(widths)
    if overhead is None:
        return [list(range(start, min(start + max_rows, n))) for start in range(0, n, max_rows)]
    order = sorted(range(n), key=widths.__getitem__)
    best, start = [0] + [math.inf] * n, [0] * (n + 1)   # best[j]: cost of the first j sorted rows
    for j in range(1, n + 1):
        tokens = prompt + widths[order[j - 1]]            # the widest of any run ending at row j
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + (j - i) * tokens + overhead
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[start[j]:j])
        j = start[j]
    return groups[::-1]


@dataclasses.dataclass
class SharedPrefix:
    """The prompts of a batch computed once (RolloutRecordMixin._shared_prefix): their KV cache, the
    distinct prompt of each row, the prefix forward's (used, free) routes, and its length in tokens."""

    cache: object
    of_row: torch.Tensor
    routes: tuple[torch.Tensor, torch.Tensor] | None
    length: int


def count_repeats(model, used: torch.Tensor, mask: torch.Tensor, repeats: torch.Tensor) -> None:
    """Add to each MoE gate's load count the experts of `used` [u, P, MoE layers, K] once more per repeat
    of its row (`repeats` [u]) at the tokens of `mask` [u, P]: what forwards over every row would count."""
    real = mask.bool()
    weights = repeats[:, None].expand_as(real)[real].float()                 # [N] per real token
    with torch.no_grad():
        for layer, gate in enumerate(routing.moe_gates(model)):
            ids = used[:, :, layer][real].long()                               # [N, K]
            gate.expert_load += torch.bincount(ids.flatten(), weights=weights.repeat_interleave(ids.shape[1]),
                                               minlength=gate.expert_load.numel()).to(gate.expert_load.device)


def may_share_prefixes(trainer) -> bool:
    """Whether a trainer may compute a shared prefix once and send the rows' gradients back through its
    KV cache: not under FSDP or DeepSpeed, whose parameters are gathered for a module's backward when the
    gradient reaches the module's output, not a cache (GRPO's shared prompts crashed FSDP2)."""
    return not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)


def prefix_forward(model, ids: torch.Tensor, mask: torch.Tensor, repeats: torch.Tensor, routed: bool,
                   replay: torch.Tensor | None = None):
    """(KV cache, (used, free) routes or None) of one forward over the prefixes `ids` [u, P] that rows of a
    batch share, each prefix standing for `repeats[u]` rows more than this forward counts: in training,
    each MoE gate's load counts them once per row, as forwards over whole rows would (`count_repeats`)."""
    recording = routing.recording(model) if routed else contextlib.nullcontext()
    with routing.replaying(model, replay), recording as log_:
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).past_key_values
    if routed and model.training:
        count_repeats(model, log_[0][0], mask, repeats)
    return cache, log_[0] if routed else None


def cache_for_rows(cache, rows: torch.Tensor | int) -> DynamicCache:
    """A fresh cache for the forwards of rows that attend to a shared prefix's `cache` (which their
    forwards then leave as it is): row i gets the prefix row `rows[i]`, or with `rows` an int, the one
    prefix row `rows` times (a view)."""
    fresh = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        if isinstance(rows, int):
            keys, values = (t.expand(rows, *t.shape[1:]) for t in (layer.keys, layer.values))
        else:
            keys, values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        fresh.update(keys, values, layer_idx)
    return fresh


class SampledLogprobs(LogitsProcessor):
    """Reads, while `generate` samples, the logprob of every sampled token under the sampling policy:
    log softmax(logits / T) as TRL computes the trainer's, one step behind (a step's token is known at
    the next call; `finish` takes the last). Holds one [B, V] row at a time, never the whole history."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self._take(input_ids[:, -1])
        self.pending = (scores.float() / self.temperature).log_softmax(-1)
        return scores

    def _take(self, tokens):
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, tokens[:, None].to(self.pending.device)).squeeze(1))

    def finish(self, sequences) -> torch.Tensor:
        self._take(sequences[:, -1])
        self.pending = None
        return torch.stack(self.steps, dim=1).cpu()                        # [B, new tokens]


class RolloutRecordMixin:
    """For a GRPOTrainer subclass: see the module docstring. `configure_rollouts` after __init__."""

    routing_replay, rollout_precision, mismatch_metrics = "none", "model", True
    bucket_overhead_tokens: int | None = BUCKET_OVERHEAD_TOKENS  # length_buckets; None: whole rows in TRL's chunks
    _rollout_routes: list | None = None   # per sample of the generation batch, from the last rollout
    _batch_routes: dict | None = None     # while a batch is generated and scored: its rollout and train routes
    _loss_inputs: dict | None = None      # while a loss is computed: its batch

    def configure_rollouts(self, options: dict) -> None:
        self.routing_replay = options.get("routing_replay", "none")
        self.rollout_precision = options.get("rollout_precision", "model")
        self.mismatch_metrics = options.get("mismatch_metrics", True)
        if self.routing_replay != "none" and not self._routed():
            raise ValueError(f"routing_replay = {self.routing_replay!r} needs our MoE policy with MoE layers; "
                             f"{type(self._policy()).__name__} has no routers to replay")
        if self.rollout_precision != "model" and not isinstance(self._policy(), policy.POLICY_CLASS):
            raise ValueError(f"rollout_precision = {self.rollout_precision!r} needs our policy (its FP8 GEMMs); "
                             f"{type(self._policy()).__name__} has none")
        if self.args.use_vllm and (self.rollout_precision == "fp8" or self.routing_replay == "r3"):
            raise ValueError(VLLM_REFUSAL.format(replay=self.routing_replay, precision=self.rollout_precision))
        if self.routing_replay == "r2" and self._single_pass():
            log("routing_replay = r2: each batch is trained on once and no forward precedes it, so there is "
                "nothing to replay (set num_iterations > 1 or steps_per_generation > 1)")

    def _policy(self, model=None):
        """The model under the trainer's wrappers (DDP, PEFT): of `model`, by default the policy's."""
        return unwrapped(self.accelerator.unwrap_model(self.model if model is None else model))

    def _routed(self, model=None) -> bool:
        """Whether the policy (or `model`) has routers to record: our model with at least one MoE layer."""
        model = self._policy(model)
        return isinstance(model, policy.POLICY_CLASS) and any(layer.is_moe for layer in model.model.layers)

    def _own_rollouts(self) -> bool:
        """Whether this trainer's transformers rollouts keep sampling logprobs (and routes, and FP8)."""
        return not self.args.use_vllm and (self.mismatch_metrics or self.rollout_precision == "fp8"
                                           or self.routing_replay != "none")

    def _single_pass(self) -> bool:
        """Whether each batch gets one training forward, before any update it takes part in (the module
        docstring): then TRL's "old" logprobs of the batch would be that forward's own."""
        return self.num_iterations == 1 and self.args.gradient_accumulation_steps % self.args.steps_per_generation == 0

    def _measured_in_loss(self) -> bool:
        """Whether the mismatch, the trainer's routes and the importance ratio come from the loss's forward:
        on a single pass, for rollouts that keep their sampling logprobs (ours, or vLLM's)."""
        return (self._own_rollouts() or self.args.use_vllm) and self._single_pass()

    @contextlib.contextmanager
    def _use_vllm_reads(self, value: bool):
        """TRL gates its use of sampling logprobs (the old-logprob pass, the importance-sampling ratio,
        its `sampling/*` metrics, the correction in the loss: grpo_trainer.py L2644-2909, L3146) on
        `use_vllm`. Our transformers rollouts have those logprobs too: around scoring and the loss the
        gate reads true, and around generation itself false again, so that TRL generates with transformers.
        With vLLM's rollouts measured in the loss, scoring reads false (no old-logprob pass) while `_generate`
        keeps it true."""
        if not (self._own_rollouts() or self._measured_in_loss()):
            yield
            return
        before, self.use_vllm = self.use_vllm, value
        try:
            yield
        finally:
            self.use_vllm = before

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self._own_rollouts() or images is not None or multimodal_fields:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        # TRL's own transformers path (pad, generate, cut after EOS), with the unwrapped model's `generate`
        # wrapped for the duration: the sampling logprobs, the routes, FP8 weights.
        model = self.accelerator.unwrap_model(self.model_wrapped)
        sampled, seen = SampledLogprobs(self.temperature), {}
        plain = model.generate

        def generate(*args, **kwargs):
            fp8 = fp8_compute(model) if self.rollout_precision == "fp8" else contextlib.nullcontext()
            record = routing.recording(model) if self._routed() else contextlib.nullcontext()
            with fp8, record as routes:
                out = plain(*args, logits_processor=LogitsProcessorList([sampled]), **kwargs)
            seen.update(sequences=out, prompt_mask=kwargs["attention_mask"], routes=routes)
            return out

        model.generate = generate
        try:
            with self._use_vllm_reads(False):
                completion_ids, _ = super()._generate_single_turn(prompt_ids, images, multimodal_fields,
                                                                  num_generations, has_tool_images)
        finally:
            del model.generate
        logprobs = sampled.finish(seen["sequences"])
        lengths = [len(ids) for ids in completion_ids]
        self._rollout_routes = None
        if seen["routes"] is not None:
            self._rollout_routes = routing.generated_routes(seen["routes"], seen["prompt_mask"].cpu(), lengths)
        return completion_ids, [row[:n].tolist() for row, n in zip(logprobs, lengths)]

    def _generate(self, prompts):
        """TRL's; with vLLM, always with the gate true (its weight sync and engine), whatever scoring reads."""
        if not self.args.use_vllm:
            return super()._generate(prompts)
        before, self.use_vllm = self.use_vllm, True
        try:
            return super()._generate(prompts)
        finally:
            self.use_vllm = before

    def _generate_and_score_completions(self, inputs):
        in_loss = self._measured_in_loss()
        self._batch_routes = {"rollout": None, "train": None}  # filled by the batch's first training forward
        try:
            # Measured in the loss: TRL's own on-policy path here, without the old-logprob pass.
            with self._use_vllm_reads(not in_loss):
                output = super()._generate_and_score_completions(inputs)
            routes = self._batch_routes
        finally:
            self._batch_routes = None
        if in_loss and self._rollout_routes is not None:
            mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            routes["rollout"] = routing.aligned(self._rollout_routes, mask)
            if self.routing_replay != "r3":  # under r3 they travel as the routes to replay, below
                output["rollout_routes"] = routes["rollout"]
        replay = {"r3": routes["rollout"], "r2": routes["train"] and routes["train"][0]}.get(self.routing_replay)
        if replay is not None:
            output["routed_experts"] = replay
        kept = output.get("routed_experts", routes["rollout"])
        if kept is not None:
            self._log_metrics({"routing/bytes": torch.tensor(float(routing.nbytes(kept)))})
        if not in_loss:
            self._log_mismatch(output.get("old_per_token_logps"), output, routes["rollout"], routes["train"])
        return output

    def _compute_loss(self, model, inputs):
        self._loss_inputs = inputs
        try:
            with self._use_vllm_reads(True):
                return super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           **kwargs):
        """TRL's, chunk by chunk, with the batch's routes replayed. The forward that measures the mismatch
        (TRL's old-logprob pass, or on a single pass the loss's own) also records the experts it used and
        would choose; on a single pass it then sets the loss's importance ratio and logs the mismatch."""
        batch, loss = self._batch_routes, self._loss_inputs
        first = batch is not None and batch["train"] is None and model is self.model
        in_loss = loss is not None and self._measured_in_loss()
        replay = None if loss is None else loss.get("routed_experts")
        if first and self._rollout_routes is not None:
            batch["rollout"] = routing.aligned(self._rollout_routes, attention_mask)
            replay = batch["rollout"] if self.routing_replay == "r3" else None
        rollout_routes = loss.get("routed_experts", loss.get("rollout_routes")) if in_loss else None
        record = first or rollout_routes is not None
        text_only = all(value is None for name, value in kwargs.items() if not name.startswith("compute_"))
        train_routes = None
        if not text_only:  # TRL's own forward for images and other per-sample inputs
            result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                batch_size, **kwargs)
        else:
            routed = self._routed()
            result, train_routes = self._forward_by_length(model, input_ids, attention_mask, logits_to_keep,
                                                           batch_size, replay if routed else None,
                                                           record and routed, kwargs)
            if first and routed:
                batch["train"] = train_routes
        if in_loss:
            train = result[0].detach()
            if self.vllm_importance_sampling_correction:  # read by TRL's loss right after this forward
                loss["importance_sampling_ratio"] = self._importance_ratio(train, loss, cut=True)
            self._log_mismatch(train, loss, rollout_routes, train_routes, trl_metrics=True)
        return result

    def _forward_by_length(self, model, input_ids, attention_mask, logits_to_keep, batch_size, replay, record,
                           kwargs):
        """TRL's forward (logprobs, entropies, aux loss) over groups of rows of similar completion length,
        each group cut after its longest completion (`length_buckets`), put back in the batch's order and
        padded to `logits_to_keep` (zeros, under the completion mask): a completion's tokens see only
        those before them, so cutting a group's trailing padding changes none of its rows. Rows that share
        a prompt compute it once (`_shared_prefix`). With `replay` [B, S, L, K] each forward routes by its
        rows and columns of it; with `record`, also returns the (used, free) routes of the forward,
        NO_ROUTE past each group's cut."""
        B, S = input_ids.shape
        prompt = S - logits_to_keep
        widths = row_lengths(attention_mask[:, prompt:]).clamp(min=1).tolist()
        prefix = self._shared_prefix(model, input_ids, attention_mask, prompt, replay, kwargs)
        start = 0 if prefix is None else prefix.length   # the first column each group's forward computes
        groups = length_buckets(widths, prompt - start, batch_size or B, self.bucket_overhead_tokens)
        logps, entropies, aux, routes = [], [], [], []
        for rows in groups:
            width, index = max(widths[i] for i in rows), torch.tensor(rows, device=input_ids.device)
            cut = prompt + width
            recording = routing.recording(model) if record else contextlib.nullcontext()
            with routing.replaying(model, None if replay is None else replay[index, start:cut]), recording as log_:
                if prefix is None:
                    part = super()._get_per_token_logps_and_entropies(
                        model, input_ids[index, :cut], attention_mask[index, :cut], width, None, **kwargs)
                else:
                    part = self._logps_after_prefix(model, prefix, index, input_ids[index, start:cut],
                                                    attention_mask[index, :cut], width, kwargs)
            logps.append(F.pad(part[0], (0, logits_to_keep - width)))
            if part[1] is not None:
                entropies.append(F.pad(part[1], (0, logits_to_keep - width)))
            if part[2] is not None:
                aux.append(part[2])
            if record:
                own = log_[0] if prefix is None else [torch.cat([shared[prefix.of_row[index]], tail], dim=1)
                                                      for shared, tail in zip(prefix.routes, log_[0])]
                routes.append([F.pad(r, (0, 0, 0, 0, 0, S - cut), value=routing.NO_ROUTE) for r in own])
        order = torch.tensor([i for rows in groups for i in rows], device=input_ids.device)
        back = torch.empty_like(order)
        back[order] = torch.arange(B, device=order.device)  # the inverse permutation
        result = (torch.cat(logps)[back], torch.cat(entropies)[back] if entropies else None,
                  torch.stack(aux).mean() if aux else None)
        if not record:
            return result, None
        return result, tuple(torch.cat(column)[back.to(column[0].device)] for column in zip(*routes))

    def _shared_prefix(self, model, input_ids, attention_mask, prompt, replay, kwargs) -> SharedPrefix | None:
        """GRPO's rows come in groups that share a prompt: one forward over each distinct prompt but its last
        token (kept per row: its logits score a row's first completion token) with a KV cache, which the
        rows' forwards then attend to (`_logps_after_prefix`), instead of computing the prompt once per
        row (the prompt is ~40% of the embedded default's training tokens). Gradients reach the shared
        prompt through the cache. The routing bias's load counts each prompt token once per row, as the
        forward over whole rows would. None (whole rows) where it would not pay or does not apply: our
        policy only, not under gradient checkpointing (which drops the cache), not with an aux loss
        (a sequence-level sum), nor where replayed routes differ within a group's prompt, nor under FSDP
        or DeepSpeed (`may_share_prefixes`)."""
        B, length = input_ids.shape[0], prompt - 1
        if (self.bucket_overhead_tokens is None or length < 1 or kwargs.get("compute_aux_loss")
                or not may_share_prefixes(self)
                or not isinstance(self._policy(model), policy.POLICY_CLASS)
                or (model.training and routing.backbone(model).gradient_checkpointing)):
            return None
        head = torch.cat([input_ids[:, :prompt], attention_mask[:, :prompt]], dim=1)
        unique, of_row = torch.unique(head, dim=0, return_inverse=True)
        if (B - unique.shape[0]) * length <= self.bucket_overhead_tokens:
            return None
        first = torch.full((unique.shape[0],), B, device=of_row.device).scatter_reduce(
            0, of_row, torch.arange(B, device=of_row.device), "amin")            # a row of each prompt
        if replay is not None and not torch.equal(replay[:, :length], replay[first[of_row], :length]):
            return None
        repeats = torch.bincount(of_row, minlength=unique.shape[0]) - 1
        with self.accelerator.autocast():
            cache, routes = prefix_forward(model, input_ids[first, :length], attention_mask[first, :length], repeats,
                                           self._routed(model), None if replay is None else replay[first, :length])
        return SharedPrefix(cache, of_row, routes, length)

    def _logps_after_prefix(self, model, prefix: SharedPrefix, index, ids, attention_mask, width, kwargs):
        """TRL's (logprobs, entropies, None) of rows `index` from `ids` [b, 1 + width] (the prompt's last
        token, then the completion) over their prompts' shared cache; `attention_mask` [b, P + width]."""
        cache = cache_for_rows(prefix.cache, prefix.of_row[index])
        labels = ids.masked_fill(attention_mask[:, -ids.shape[1]:] == 0, -100)
        with self.accelerator.autocast():
            out = model(input_ids=ids, attention_mask=attention_mask, past_key_values=cache,
                        shift_labels=F.pad(labels[:, 1:], (0, 1), value=-100), fused_lm_head=True)
        entropy = out.entropy[:, :width] if kwargs.get("compute_entropy") else None
        return out.log_probs[:, :width], entropy, None

    def _importance_ratio(self, train, batch: dict, cut: bool) -> torch.Tensor:
        """TRL's importance-sampling ratio π_train / π_rollout (grpo_trainer.py L2660-2705), per token [B, T] or
        per sequence [B, 1] in its vllm_importance_sampling_mode; with `cut`, truncated to the clip range
        (*_truncate) or set to 0 outside it (*_mask), as the loss uses it."""
        diff = torch.nan_to_num((train - batch["sampling_per_token_logps"]) * loss_mask(batch), nan=0.0)
        mode = self.vllm_importance_sampling_mode
        ratio = (diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff).exp()
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if not cut or (low is None and high is None):
            return ratio
        if mode.endswith("truncate"):
            return ratio.clamp(min=low, max=high)
        return ratio.masked_fill(self._outside_clip(ratio), 0.0)

    def _outside_clip(self, ratio: torch.Tensor) -> torch.Tensor:
        """Where an importance ratio falls outside TRL's clip range (a missing bound cuts nothing)."""
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        return (ratio < (-math.inf if low is None else low)) | (ratio > (math.inf if high is None else high))

    def _log_mismatch(self, train, batch: dict, rollout_routes, train_routes, trl_metrics: bool = False) -> None:
        """The module docstring's metrics for a batch (`train`: the trainer's logprobs of it), gathered over
        processes; with `trl_metrics`, also those TRL logs where it computes the ratio itself (its
        `sampling/sampling_logp_difference/*` and `sampling/importance_sampling_ratio/*`)."""
        mask = loss_mask(batch)
        rollout = batch.get("sampling_per_token_logps")
        values, extremes = {}, {}
        if rollout is not None and train is not None:
            log_ratio = (train - rollout)[mask.bool()]
            log_ratio = log_ratio[~torch.isnan(log_ratio)]
            if log_ratio.numel():
                values["sampling/kl_k3"] = (torch.expm1(log_ratio) - log_ratio).mean()
                values["sampling/abs_dlogp_mean"] = log_ratio.abs().mean()
                values["sampling/frac_dlogp_gt_ln2"] = (log_ratio.abs() > math.log(2)).float().mean()
            ratio = batch.get("importance_sampling_ratio")
            if ratio is not None:
                values["sampling/is_clip_frac"] = self._is_clip_fraction(train, batch)
            if trl_metrics and ratio is not None:
                delta = log_ratio.abs() if log_ratio.numel() else torch.zeros(1, device=mask.device)
                sequence = self.vllm_importance_sampling_mode.startswith("sequence")
                flat = ratio.flatten() if sequence else ratio[mask.bool()]
                flat = flat if flat.numel() else torch.zeros(1, device=mask.device)
                values["sampling/sampling_logp_difference/mean"] = delta.mean()
                values["sampling/importance_sampling_ratio/mean"] = flat.mean()
                extremes = {"sampling/sampling_logp_difference/max": (delta.max(), torch.max),
                            "sampling/importance_sampling_ratio/min": (flat.min(), torch.min),
                            "sampling/importance_sampling_ratio/max": (flat.max(), torch.max)}
        if rollout_routes is not None and train_routes is not None:
            completion = torch.cat([torch.zeros_like(batch["prompt_mask"]), mask], dim=1)
            used, free = train_routes
            for suffix, routes in (("", used), ("_free", free)):
                for name, value in routing.mismatch(rollout_routes, routes, completion).items():
                    values[f"routing/{name}_mismatch{suffix}"] = torch.tensor(value)
        self._log_metrics(values)
        self._log_metrics({name: value for name, (value, _) in extremes.items()},
                          reduce={name: reduce for name, (_, reduce) in extremes.items()})

    def _log_metrics(self, values: dict, reduce: dict | None = None) -> None:
        """One value per metric, gathered over processes: their mean, or `reduce[name]` of them."""
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        for name, value in values.items():
            gathered = self.accelerator.gather(value.to(device).float().reshape(1))
            self._metrics[mode][name].append((reduce or {}).get(name, torch.mean)(gathered).item())

    def _is_clip_fraction(self, train, batch: dict) -> torch.Tensor:
        """Share of tokens (sequences, in TRL's sequence modes) whose importance ratio the correction cut."""
        cut = self._outside_clip(self._importance_ratio(train, batch, cut=False))
        if self.vllm_importance_sampling_mode.startswith("sequence"):
            return cut.float().mean()
        return cut[loss_mask(batch).bool()].float().mean()
