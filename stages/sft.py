"""Stage 1, cold-start SFT: teach the R1 format (reasoning in <think>, then <answer>) with TRL's
SFTTrainer, the loss on the completion only."""

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
    mean over sequences, is averaged over the accumulation steps as TRL does for an MoE aux loss."""

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
        groups = self._length_groups(model, inputs, return_outputs, num_items_in_batch)
        if groups is None:
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The micro-batch in groups of rows of similar length, each cut after its longest row (TRL pads every
        # row to the longest): the loss is a sum over the step's targets (num_items_in_batch), the balance
        # loss a mean over sequences, so the groups' losses add up to the whole batch's.
        shape = inputs["attention_mask"].shape
        metrics, before = self._metrics["train"], {name: len(self._metrics["train"][name]) for name in PER_CALL}
        loss, targets = 0.0, []
        for rows, length in groups:
            part = {name: value[rows, :length] if torch.is_tensor(value) and value.shape == shape else value
                    for name, value in inputs.items()}
            loss = loss + self._compute_loss(model, part, False, num_items_in_batch, share=len(rows) / shape[0])
            targets.append(float((part["labels"][:, 1:] != -100).sum()))
        for name in PER_CALL:  # one value per micro-batch, as TRL logs it: the groups' means weighted by targets
            values = metrics[name][before[name]:]
            del metrics[name][before[name]:]
            metrics[name].append(sum(v * n for v, n in zip(values, targets)) / max(sum(targets), 1.0))
        return loss

    def _length_groups(self, model, inputs, return_outputs, num_items_in_batch):
        """[(row index, cut)] for the micro-batch's forward (`length_buckets` over the rows' lengths), or None
        for one forward: unless the batch is right-padded rows for our policy in training, its loss normalised
        over the step's targets (and the MTP loss, when on, over the step's MTP targets), or where one group
        is cheapest."""
        from stages.rollouts import BUCKET_OVERHEAD_TOKENS, length_buckets, row_lengths

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
        if len(groups) < 2:
            return None
        # The MTP modules run over all positions but the last k of the padded batch, a row's last real token
        # included unless the row is the longest: one padding column more keeps that so in every group.
        extra = 1 if len(core.mtp) and core.config.mtp_loss_weight else 0
        return [(torch.tensor(rows, device=mask.device), min(mask.shape[1], max(lengths[i] for i in rows) + extra))
                for rows in groups]

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
