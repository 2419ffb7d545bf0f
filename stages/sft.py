"""Stage 1, cold-start SFT: teach the R1 format (reasoning in <think>, then <answer>) with TRL's
SFTTrainer, the loss on the completion only."""

import contextlib
import dataclasses

import torch
from trl import SFTConfig, SFTTrainer

from r1pipeline import policy
from r1pipeline.config import INIT_FROM_HELP
from r1pipeline.pipeline import Stage
from r1pipeline.schema import key
from stages.common import (ExactResumeMixin, callbacks, completion_of, load_policy, peft_config, sft_row,
                           train_and_save, trainer_args, unwrapped)


@dataclasses.dataclass
class Options:
    """The stage's own keys; every other key of the `sft` section is an SFTConfig field."""

    init_from: str = key("model", INIT_FROM_HELP)


# What TRL's SFT loss logs once per call (sft_trainer.py compute_loss).
PER_CALL = ("entropy", "mean_token_accuracy")


class ResumableSFTTrainer(ExactResumeMixin, SFTTrainer):
    """SFTTrainer that keeps our policy's own training losses.

    TRL 1.16 computes the SFT loss through a fused LM head that runs the backbone (`model.model`)
    itself (trl/trainer/utils.py `add_fused_lm_head`), so `R1MoEForCausalLM.forward` never runs and
    with it go the multi-token-prediction loss (λ·L_MTP, `mtp_loss_weight`) and the sequence-wise
    balance loss (`seq_aux_alpha`). They are added back here from the backbone's own output, caught by
    a forward hook (no second pass). L_MTP is normalised like the main loss, by its targets over the
    whole optimizer step (every accumulation step and process, counted in `get_batch_samples`), so a
    sharded or accumulated run trains what one process on the whole batch does; the balance loss, a
    mean over sequences, is averaged over the accumulation steps as TRL does for an MoE aux loss.

    For our policy a micro-batch's forward is split, with the same loss, gradients, metrics and load
    counts (tests/test_sft.py): the first tokens every row shares (the system prompt) are computed once,
    and the rows in groups of similar length after them. On the embedded default that took 100 SFT
    steps from 26.6 s to 21.7 s (2-core AMD EPYC)."""

    def _policy(self, model=None):
        core = unwrapped(self.accelerator.unwrap_model(model if model is not None else self.model))
        return core if isinstance(core, policy.POLICY_CLASS) else None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        core, self._mtp_items = self._policy(), None
        if core is not None and len(core.mtp) and num_items_in_batch is not None:
            counts = sum(core.mtp_target_counts(batch["labels"]) for batch in batch_samples if "labels" in batch)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                counts = self.accelerator.gather(counts.to(device)[None]).sum(0)
            self._mtp_items = counts.to(device)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plan = self._forward_plan(model, inputs, return_outputs, num_items_in_batch)
        if plan is None:
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The micro-batch in groups of rows of similar length, each cut after its longest row (TRL pads every
        # row to the longest), after the tokens every row shares, computed once: the loss is a sum over the
        # step's targets (num_items_in_batch), the balance loss a mean over sequences, so the groups' losses
        # add up to the whole batch's.
        groups, shared = plan
        shape = inputs["attention_mask"].shape
        metrics, tokens_before = self._metrics["train"], self._total_train_tokens
        before = {name: len(metrics.get(name, ())) for name in (*PER_CALL, "mtp_loss")}
        loss, targets = 0.0, []
        prefix = self._shared_prefix(model, inputs, shared) if shared else None
        try:
            with self._gathers_deferred():
                for rows, length in groups:
                    part = {name: value[rows, :length] if torch.is_tensor(value) and value.shape == shape else value
                            for name, value in inputs.items()}
                    if prefix is not None:
                        part = prefix.rows(part)
                    loss = loss + self._compute_loss(model, part, False, num_items_in_batch,
                                                     share=len(rows) / shape[0])
                    targets.append(float((part["labels"][:, 1:] != -100).sum()))
        finally:
            if prefix is not None:
                prefix.close()
        # One value per micro-batch, as TRL logs it: entropy and token accuracy are the groups' means weighted
        # by their targets, the MTP loss (each group's part of the step's sum) their sum; over processes, the
        # means over all targets and (as TRL) the mean of the processes' MTP losses, and the tokens of all.
        logged = {}
        for name in (*PER_CALL, "mtp_loss"):
            values = metrics.get(name, [])[before[name]:]
            if values:
                del metrics[name][before[name]:]
                logged[name] = sum(values) if name == "mtp_loss" else sum(v * n for v, n in zip(values, targets))
        local = torch.tensor([[*logged.values(), sum(targets), self._total_train_tokens - tokens_before]],
                             dtype=torch.float64, device=self.accelerator.device)
        gathered = self.accelerator.gather(local) if self.accelerator.num_processes > 1 else local
        *sums, total, tokens = gathered.sum(0).tolist()
        for name, value in zip(logged, sums):
            metrics[name].append(value / gathered.shape[0] if name == "mtp_loss" else value / max(total, 1.0))
        self._total_train_tokens = tokens_before + int(tokens)
        metrics["num_tokens"] = [self._total_train_tokens]
        return loss

    @contextlib.contextmanager
    def _gathers_deferred(self):
        """Within it, the metric gathers of TRL's loss (and ours) keep each process's own values: the
        processes can split their micro-batches into different numbers of forwards, so per-forward
        collectives would not match up (the run hung); `compute_loss` gathers once, after them."""
        if self.accelerator.num_processes == 1:
            yield
            return
        accelerator = self.accelerator
        accelerator.gather = accelerator.gather_for_metrics = lambda value, *args, **kwargs: value
        try:
            yield
        finally:
            del accelerator.gather, accelerator.gather_for_metrics

    def _forward_plan(self, model, inputs, return_outputs, num_items_in_batch):
        """([(row index, cut)], shared prefix length) for the micro-batch's forwards: its rows in groups of
        similar length (`length_buckets` over the rows' lengths) after the tokens all rows share and no loss
        reads (`_shared_length`), or None for one forward: unless the batch is right-padded rows for our
        policy in training, its loss normalised over the step's targets (and the MTP loss, when on, over the
        step's MTP targets), or where one forward over whole rows is cheapest."""
        from stages.rollouts import BUCKET_OVERHEAD_TOKENS, length_buckets, may_share_prefixes, row_lengths

        core = self._policy(model)
        mask = inputs.get("attention_mask")
        if (core is None or not core.training or return_outputs or num_items_in_batch is None
                or "labels" not in inputs or mask is None or mask.dim() != 2 or "position_ids" in inputs
                or (len(core.mtp) and core.config.mtp_loss_weight and getattr(self, "_mtp_items", None) is None)):
            return None
        lengths = row_lengths(mask)
        right_padded = torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
        if not torch.equal(mask.bool(), right_padded):
            return None
        lengths = lengths.clamp(min=1).tolist()
        groups = length_buckets(lengths, 0, len(lengths), BUCKET_OVERHEAD_TOKENS)
        shared = self._shared_length(core, inputs, BUCKET_OVERHEAD_TOKENS) if may_share_prefixes(self) else 0
        if len(groups) < 2 and not shared:
            return None
        # The MTP modules run over all positions but the last k of the padded batch, a row's last real token
        # included unless the row is the longest: one padding column more keeps that so in every group.
        extra = 1 if len(core.mtp) and core.config.mtp_loss_weight else 0
        return [(torch.tensor(rows, device=mask.device), min(mask.shape[1], max(lengths[i] for i in rows) + extra))
                for rows in groups], shared

    @staticmethod
    def _shared_length(core, inputs, overhead: int) -> int:
        """How many first tokens every row of a right-padded micro-batch has in common and no loss reads
        (the system prompt and the template's first words: ~26 of the embedded default's ~60 tokens a row),
        or 0 where computing them once would not pay `overhead` tokens' worth for the extra forward, or does
        not apply: not under gradient checkpointing (which drops the cache), not with the MTP loss (its
        modules read every position's hidden state); nor, as the caller checks, under FSDP or DeepSpeed
        (`may_share_prefixes`)."""
        ids, labels = inputs["input_ids"], inputs["labels"]
        if (ids.shape[0] < 2 or core.model.gradient_checkpointing or (len(core.mtp) and core.config.mtp_loss_weight)
                or labels.shape != ids.shape):
            return 0
        common = int(((ids == ids[:1]) & inputs["attention_mask"].bool()).all(0).long().cumprod(0).sum())
        scored = (labels != -100).any(0).nonzero()
        # The label at a position is scored from the hidden state before it: the rows' forward after the
        # prefix must start before the first scored label.
        length = min(common, int(scored[0]) - 1 if len(scored) else common)
        return length if (ids.shape[0] - 1) * length > overhead else 0

    def _shared_prefix(self, model, inputs, length: int) -> "SharedPrefix":
        """One forward over the micro-batch's first `length` tokens (the same in every row), with a KV cache
        its rows' forwards then attend to; gradients reach the prefix through the cache. The routing bias's
        load counts and the sequence-wise balance loss count the prefix once per row, as forwards over
        whole rows do."""
        from stages.rollouts import prefix_forward

        core = self._policy(model)
        moes = [layer.mlp for layer in core.model.layers if layer.is_moe]
        for moe in moes:
            moe.keep_prefix_sums, moe.prefix_sums = True, None
        try:
            cache, _ = prefix_forward(model, inputs["input_ids"][:1, :length], inputs["attention_mask"][:1, :length],
                                      torch.tensor([inputs["input_ids"].shape[0] - 1]), routed=bool(moes))
        finally:
            for moe in moes:
                moe.keep_prefix_sums = False
        return SharedPrefix(cache, length, moes)

    def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, share: float = 1.0):
        """TRL's loss plus our policy's (`share`: these rows' part of the micro-batch, for the balance loss)."""
        core = self._policy(model)
        if not (core is not None and core.training and "labels" in inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        # Counted over the whole step (get_batch_samples); else this micro-batch's mean, averaged over steps.
        mtp_items = getattr(self, "_mtp_items", None) if num_items_in_batch is not None else None
        # DDP and FSDP average the processes' gradients; like TRL's main loss, a sum over every process's
        # targets is scaled back up by their number.
        mtp_scale = (self.accelerator.num_processes if self.args.average_tokens_across_devices else 1) \
            if mtp_items is not None else 1 / steps
        extra, mtp_logged = [], []

        def add_policy_losses(backbone, args, kwargs, output):
            # Inside the model's forward, where FSDP2 has the root's weights (embeddings, LM head) gathered;
            # the loss's forward only (with return_outputs TRL runs another, for the logits).
            if extra:
                return
            extra.append(None if output.aux_loss is None else output.aux_loss * share / steps)
            if len(core.mtp) and core.config.mtp_loss_weight:
                mtp_loss, mtp_aux = core.mtp_losses(output.last_hidden_state, kwargs["input_ids"], inputs["labels"],
                                                    kwargs.get("attention_mask"), kwargs.get("position_ids"),
                                                    num_items=mtp_items)
                extra.extend([core.config.mtp_loss_weight * mtp_loss * mtp_scale,
                              None if mtp_aux is None else mtp_aux * share / steps])
                mtp_logged.append(mtp_loss.detach() * mtp_scale * steps)  # averaged over ranks and steps: the mean

        hook = core.model.register_forward_hook(add_policy_losses, with_kwargs=True)
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            hook.remove()
        if mtp_logged:
            self._metrics["train"]["mtp_loss"].append(self.accelerator.gather(mtp_logged[0]).mean().item())
        extra = sum(term for term in extra if term is not None)
        if return_outputs:  # (TRL recomputes the logits for them with a second forward)
            return result[0] + extra, result[1]
        return result + extra


class SharedPrefix:
    """A micro-batch's shared first tokens, computed once (ResumableSFTTrainer._shared_prefix): `rows` turns
    a group of its rows into the inputs of a forward over the rest, `close` ends the MoE layers' use of the
    prefix's balance sums."""

    def __init__(self, cache, length: int, moes: list):
        self.cache, self.length, self.moes = cache, length, moes

    def rows(self, part: dict) -> dict:
        """`part` (rows of the micro-batch, whole) as the forward after the prefix: its tokens and labels from
        the prefix's end, the whole attention mask, a cache with the prefix's keys and values for each row."""
        from stages.rollouts import cache_for_rows

        return {**part, "input_ids": part["input_ids"][:, self.length:], "labels": part["labels"][:, self.length:],
                "past_key_values": cache_for_rows(self.cache, part["input_ids"].shape[0])}

    def close(self) -> None:
        for moe in self.moes:
            moe.prefix_sums = None


def build_dataset(stage: Stage):
    train = stage.datasets["train"]
    return train.map(lambda row: sft_row(stage, row["prompt"], completion_of(row)), remove_columns=train.column_names)


def train(stage: Stage, dataset, model, tokenizer, final=None, **defaults) -> dict:
    """SFT on prompt-completion rows (stage 1's data, or stage 3's selected samples; stage 0's text),
    saved to `final` (default: the stage's final/). `defaults`: SFTConfig fields the recipe may override."""
    # completion_only_loss=None means TRL's default for prompt-completion data: loss on the completion.
    args = SFTConfig(**trainer_args(stage, model, **defaults))
    trainer = ResumableSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  callbacks=callbacks(stage), peft_config=peft_config(stage))
    return train_and_save(trainer, stage, final)


def run(stage: Stage) -> dict:
    model, tokenizer = load_policy(stage)
    return train(stage, build_dataset(stage), model, tokenizer)
