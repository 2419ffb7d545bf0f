"""Stage 2, GRPO with rule-based rewards: TRL's GRPOTrainer, groups of `num_generations`
completions per prompt, the recipe's rewards and weights. Rollouts come from transformers
`generate`, or vLLM (its CPU build here, CUDA on GPU) with `use_vllm: true`. Routing replay, FP8
rollouts and the train/rollout mismatch metrics: stages/rollouts.py."""

import contextlib
import dataclasses
import hashlib
import random
from pathlib import Path

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.generation import vllm_generation
from trl.generation.vllm_generation import VLLMGeneration, empty_cache
from trl.trainer import grpo_trainer

from r1pipeline import policy, vllm_engine
from r1pipeline.config import INIT_FROM_HELP, REWARDS_HELP
from r1pipeline.pipeline import Stage, log
from r1pipeline.schema import key
from r1pipeline.vllm_engine import WeightSyncError
from rewards.text import completion_text
from stages.rollouts import RolloutKeys, RolloutRecordMixin, trl_defaults
from stages.common import (ExactResumeMixin, callbacks, load_policy, peft_config, prompt_of, read_metrics,
                           train_and_save, trainer_args, unwrapped)


@dataclasses.dataclass
class VLLMSync:
    """`vllm_sync`: how a colocated vLLM engine receives the policy's weights."""

    verify: bool | None = key(None, "after every weight sync, read the engine's weights back and compare them with "
                                    "the trainer's, tensor by tensor (default: true on vLLM's CPU build, false on GPU "
                                    "and for FP8 policies)")
    timeout: float = key(600.0, "seconds a sync may take before the run stops with an error",
                         check=lambda seconds: seconds > 0, what="a number of seconds > 0")


@dataclasses.dataclass
class Options(RolloutKeys):
    """The stage's own keys; every other key of the `grpo` section is a GRPOConfig field."""

    init_from: str = key("sft", INIT_FROM_HELP)
    rewards: list | None = key(None, REWARDS_HELP)
    shuffle_rewards: bool = key(False, "control runs: permute each group's rewards among its completions (same "
                                       "compute, no learning signal)")
    vllm_sync: dict | None = key(None, "with use_vllm (colocate): verify, timeout", schema=VLLMSync)


class CheckpointFormatVLLM(VLLMGeneration):
    """TRL's vLLM backend, fed our MoE policy's weights as its checkpoint holds them, and checked.

    TRL streams `named_parameters()`. vLLM's DeepseekV3 `load_weights` reads checkpoint names: fused
    experts (`experts.gate_up_proj`) are a KeyError there, and the routing bias, a buffer, would never
    arrive. `vllm_weights()` yields per-expert tensors, the bias, and with FP8 on, e4m3 `weight` plus
    `weight_scale_inv` blocks, which is what the engine loaded from the FP8 checkpoint.

    A colocated sync runs under `sync_timeout` seconds and, with `verify_sync`, ends by reading the
    engine's weights back and comparing them with the trainer's tensor by tensor (exact in fp32). A
    sync that raises, overruns or verifies unequal raises WeightSyncError, and the engine refuses to
    generate after it: a run stops rather than go on sampling from stale or half-loaded weights."""

    sync_timeout: float = 600.0
    verify_sync: bool = True  # the trainer sets it (verify_default)
    _sync_failed: str | None = None

    def _iter_named_params(self):
        # Replaces trl/generation/vllm_generation.py L435-479. Every rank iterates: gathering ZeRO-3
        # shards is a collective (TRL's own rule).
        # FSDP2 shards are made whole by vllm_weights itself (sharding.whole_state_dict).
        with self._dist.gather_params(list(self.model.parameters())), self._merged_policy() as merged:
            yield from merged.vllm_weights()

    @contextlib.contextmanager
    def _merged_policy(self):
        """The policy as the engine must hold it: under LoRA, its adapter merged into the weights for
        the while (TRL does the same for stock models), then unmerged so that training goes on."""
        from accelerate.utils import is_peft_model

        if not is_peft_model(self.model):
            yield self.model
            return
        self.model.merge_adapter()
        try:
            yield self.model.get_base_model()
        finally:
            self.model.unmerge_adapter()

    def sync_weights(self):
        # Server mode is TRL's path (L481-517) as is: vLLM's NCCL weight-transfer engine reloads layer by
        # layer and re-runs the post-load processing (MLA's W_UK/W_UV from kv_b_proj, FP8 layouts).
        # Colocated, TRL calls the model's plain `load_weights`, which leaves that processing stale;
        # the model runner's checkpoint-format `reload_weights` is the colocated equivalent.
        if self.mode == "server":
            return super().sync_weights()
        self._check_not_failed()
        if self.enable_sleep_mode:
            empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        self._sync_failed = "a weight sync that never finished"
        vllm_engine.within_timeout(lambda: vllm_engine.reload_weights(self.llm, self._iter_named_params()),
                                   self.sync_timeout, "the weight sync into vLLM")
        if self.verify_sync:
            with self._dist.gather_params(list(self.model.parameters())), self._merged_policy() as merged:
                problems = vllm_engine.sync_mismatches(self.llm, merged)
            if problems:
                self._sync_failed = f"a weight sync after which {len(problems)} tensors differ"
                raise WeightSyncError(f"after the weight sync the engine differs from the trainer in {len(problems)} "
                                      "tensors: " + "; ".join(problems[:5]))
        self._sync_failed = None

    def _check_not_failed(self) -> None:
        if self._sync_failed:
            raise WeightSyncError(f"the vLLM engine is unusable after {self._sync_failed}; restart the stage "
                                  "(it resumes from its last checkpoint)")

    def generate(self, *args, **kwargs):
        self._check_not_failed()
        return super().generate(*args, **kwargs)


def verify_default(model, asked: bool | None) -> bool:
    """Whether each sync is read back and compared. The read-back knows the CPU build's kernels
    (tested); on GPU, kernels may keep experts in other layouts and FP8 engines requantise, so there it
    is off unless asked for, and FP8 cannot ask."""
    if getattr(model.config, "fp8", False):
        if asked:
            raise ValueError("vllm_sync.verify = true with an FP8 policy: the engine's FP8 weights are not read back; "
                             "set it false")
        return False
    if asked is None:
        asked = vllm_engine.on_cpu()
        if not asked:
            log("vllm_sync.verify: off by default on GPU (the read-back is tested on vLLM's CPU build only); "
                "set it true to compare the engine's weights with the trainer's after every sync")
    return asked


@contextlib.contextmanager
def colocated_engine_settings(args, model):
    """While GRPOTrainer builds its colocated `vllm.LLM`: this machine's engine settings
    (r1pipeline.vllm_engine: on CPU native RoPE, eager, in-process), the policy's dtype, and a clear
    error for a model the engine here cannot serve."""
    if not (args is not None and args.use_vllm and args.vllm_mode == "colocate"):
        yield
        return
    import vllm

    if vllm_engine.on_cpu():
        if not isinstance(model, policy.POLICY_CLASS):
            raise ValueError("use_vllm on vLLM's CPU build serves our MoE policy only: TRL's own sync loads weights "
                             "the CPU kernels have repacked; use_vllm=false generates with transformers")
        vllm_engine.check_servable(model.config)
    # On CPU the engine computes in the policy's dtype (float32 by default); on GPU vLLM's "auto" stands.
    cpu_dtype = {"dtype": str(model.dtype).removeprefix("torch.")} if vllm_engine.on_cpu() else {}

    def build(**kwargs):
        owns_process_group = not torch.distributed.is_initialized()  # else accelerate's (several processes)
        llm = vllm_engine.started(vllm.LLM, **vllm_engine.engine_kwargs(**cpu_dtype, **kwargs))
        llm.r1_owns_process_group = owns_process_group
        return llm

    # GRPOTrainer builds its engine inside __init__ with `LLM(...)`, a name of TRL's module: that name is
    # the one hook there is, so it points at `build` for the duration and back after.
    if not hasattr(vllm_generation, "LLM"):
        raise RuntimeError("use_vllm, but this process imported TRL with vLLM hidden (pipeline.keep_vllm_out_of_trl, "
                           "for runs whose recipe does not set use_vllm); run the stage from its own command line")
    trl_llm = vllm_generation.LLM
    vllm_generation.LLM = build
    try:
        with vllm_engine.cpu_process_settings():
            yield
    finally:
        vllm_generation.LLM = trl_llm


@contextlib.contextmanager
def reference_of_our_class(model):
    """While GRPOTrainer builds its reference model (beta > 0): for our policy, of our class. TRL loads it
    from the policy's checkpoint by the `architectures` its config names (grpo_trainer.py L1003), which
    for ours is transformers' DeepseekV3ForCausalLM (checkpoint.py writes the DeepSeek-V3 layout): the KL
    would then compare two implementations of the same weights, and the reference's forward would lack
    ours (absorbed MLA, shared prompts). `create_model_from_path` is the name of TRL's module to hook."""
    if not isinstance(unwrapped(model), policy.POLICY_CLASS):
        yield
        return
    trl_create = grpo_trainer.create_model_from_path

    def create(model_id, architecture=None, **kwargs):
        return trl_create(model_id, architecture=architecture or type(unwrapped(model)), **kwargs)

    grpo_trainer.create_model_from_path = create
    try:
        yield
    finally:
        grpo_trainer.create_model_from_path = trl_create


class ResumableGRPOTrainer(ExactResumeMixin, RolloutRecordMixin, GRPOTrainer):
    """GRPOTrainer whose checkpoints also hold the rollout buffer, and whose vLLM receives our MoE
    policy's weights in checkpoint format (`CheckpointFormatVLLM`).

    TRL generates a batch every `steps_per_generation * num_iterations` micro-steps and, after a
    resume, starts a fresh generation. A checkpoint that falls inside a generation batch would then
    train on different completions than the uninterrupted run; saving the buffer and TRL's step
    counter makes resume exact."""

    def __init__(self, *args, vllm_sync: dict | None = None, **kwargs):
        model = kwargs.get("model")
        with colocated_engine_settings(kwargs.get("args"), model), reference_of_our_class(model):
            super().__init__(*args, **kwargs)
        if self.use_vllm and isinstance(unwrapped(self.vllm_generation.model), policy.POLICY_CLASS):
            if self.vllm_generation._dist.is_fsdp and not self.accelerator.is_fsdp2:
                raise ValueError("use_vllm with our MoE policy under FSDP1: the checkpoint-format weight sync "
                                 "gathers FSDP2 and DeepSpeed ZeRO-3 shards; set fsdp_version: 2")
            # GRPOTrainer.__init__ builds its VLLMGeneration (grpo_trainer.py L1107) with no hook for the
            # class; the subclass only overrides methods, so switching the instance's class is safe.
            self.vllm_generation.__class__ = CheckpointFormatVLLM
            self.vllm_generation.verify_sync = verify_default(unwrapped(self.model), (vllm_sync or {}).get("verify"))
            self.vllm_generation.sync_timeout = (vllm_sync or {}).get("timeout", 600.0)

    def close_engine(self) -> None:
        """Shut the colocated vLLM engine down now, not whenever it is collected: under accelerate the
        process group is the trainer's, and it must outlive the engine (vllm_engine.shutdown)."""
        llm = getattr(self.vllm_generation, "llm", None) if self.use_vllm else None
        if llm is not None:
            self.vllm_generation.llm = None
            vllm_engine.shutdown(llm)

    def _state_file(self, checkpoint: str) -> Path:
        return Path(checkpoint) / f"grpo_state_rank{self.accelerator.process_index}.pt"

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        torch.save({"step": self._step, "buffered_inputs": self._buffered_inputs},
                   self._state_file(self._checkpoint_dir(trial)))

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint and self._state_file(resume_from_checkpoint).is_file():
            state = torch.load(self._state_file(resume_from_checkpoint), weights_only=False)
            self._step, self._buffered_inputs = state["step"], state["buffered_inputs"]
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def build_dataset(stage: Stage):
    # Every other column (solution, kind, ...) reaches the reward functions as a keyword argument.
    return stage.datasets["train"].map(lambda row: {"prompt": prompt_of(stage, row["prompt"])})


def shuffled_within_groups(fn, group_size: int):
    """The control: `fn`'s rewards permuted among the completions of each group. Group means and
    spreads stay, so GRPO does the same work, but which completion earned what is lost. One
    permutation per batch, drawn from the batch's text, so every reward function (and a resumed run)
    permutes the same way."""

    def shuffled(prompts, completions, completion_ids=None, **columns):
        values = fn(prompts, completions, completion_ids=completion_ids, **columns)
        text = "\x00".join(map(completion_text, completions)).encode()
        rng = random.Random(hashlib.sha1(text).hexdigest())
        out = list(values)
        for start in range(0, len(values), group_size):
            group = list(range(start, min(start + group_size, len(values))))
            for i, j in zip(group, rng.sample(group, len(group))):
                out[i] = values[j]
        return out

    shuffled.__name__ = fn.__name__
    return shuffled


def reward_trend(stage_dir) -> dict:
    """Mean total reward, and mean of each reward function, over the first and the last quarter of the
    steps that logged it ({"reward_first_quarter", "reward_last_quarter", "rewards/<name>/mean_first_quarter",
    ...}). A reward that applies to some rows only (stage 4's reward models, on general prompts) is
    logged on the steps whose batch held such rows.

    Such a reward logged per prompt kind too (`rewards/<name>/<kind>/mean`, rewards/reward_model.py)
    gets each kind's quarters, and their mean over kinds as `rewards/<name>/within_kinds_first_quarter`
    and `..._last_quarter`: the same comparison with the mix of kinds each step drew taken out."""
    rows = read_metrics(stage_dir)
    names = dict.fromkeys(key for row in rows for key in row
                          if key == "reward" or (key.startswith("rewards/") and key.endswith("/mean")))
    trend, kinds = {}, {}
    for name in names:
        values = [row[name] for row in rows if isinstance(row.get(name), (int, float))]
        if len(values) < 4:
            continue
        quarter = len(values) // 4
        trend[f"{name}_first_quarter"] = sum(values[:quarter]) / quarter
        trend[f"{name}_last_quarter"] = sum(values[-quarter:]) / quarter
        parts = name.split("/")
        if len(parts) == 4:  # rewards/<name>/<kind>/mean
            kinds.setdefault(parts[1], []).append(name)
    for reward, per_kind in kinds.items():
        for end in ("first_quarter", "last_quarter"):
            trend[f"rewards/{reward}/within_kinds_{end}"] = sum(trend[f"{n}_{end}"] for n in per_kind) / len(per_kind)
    return trend


def grpo_config(stage: Stage, model, **defaults) -> GRPOConfig:
    fields = trainer_args(stage, model, reward_weights=[reward.weight for reward in stage.rewards],
                          **{**trl_defaults(stage.section), **defaults})
    # transformers' Trainer sets config.use_cache=False (right for training forwards), and TRL's
    # generate would then run without a KV cache, recomputing the whole sequence at every step. (With
    # use_vllm these go to vLLM's SamplingParams, which has no such field.)
    if not fields.get("use_vllm"):
        fields["generation_kwargs"] = {"use_cache": True, **(fields.get("generation_kwargs") or {})}
    return GRPOConfig(**fields)


def train(stage: Stage, dataset, **defaults) -> dict:
    """GRPO from the stage's starting model over `dataset` (rendered prompts plus reward columns);
    `defaults`: GRPOConfig fields of the caller's, under the recipe's."""
    model, tokenizer = load_policy(stage)
    tokenizer.padding_side = "left"
    args = grpo_config(stage, model, **defaults)
    reward_funcs = [reward.fn for reward in stage.rewards]
    if stage.section.get("shuffle_rewards"):
        log(f"{stage.name}: control run, rewards shuffled within each group of {args.num_generations}")
        reward_funcs = [shuffled_within_groups(fn, args.num_generations) for fn in reward_funcs]
    trainer = ResumableGRPOTrainer(
        vllm_sync=stage.section.get("vllm_sync"),
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks(stage),
        peft_config=peft_config(stage),
    )
    trainer.configure_rollouts(stage.section)
    metrics = train_and_save(trainer, stage)
    trainer.close_engine()
    metrics.update(reward_trend(stage.stage_dir))
    trends = [name[:-len("_first_quarter")] for name in metrics
              if name.endswith("_first_quarter") and name.count("/") < 3]  # per-kind ones: manifest only
    if trends:
        log(f"{stage.name}: first quarter of steps -> last: " + ", ".join(
            f"{name} {metrics[name + '_first_quarter']:.3f} -> {metrics[name + '_last_quarter']:.3f}"
            for name in trends))
    return metrics


def run(stage: Stage) -> dict:
    return train(stage, build_dataset(stage))
