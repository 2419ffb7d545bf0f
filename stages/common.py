"""What every training stage shares: the starting model, the prompt template, callbacks that keep
the run directory honest, and train-with-resume then an atomic save of `final/`."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback

from data import R1_SYSTEM_PROMPT, build_tokenizer, completion_for, prompt_for, render_completion, render_prompt
from r1pipeline import policy, rundir
from r1pipeline.model import RoutingBiasCallback
from r1pipeline.pipeline import Stage, log


def system_prompt(stage: Stage) -> str:
    return (stage.recipe.get("data") or {}).get("system_prompt", R1_SYSTEM_PROMPT)


def prompt_format(stage: Stage) -> str:
    return (stage.recipe.get("data") or {}).get("prompt_format", "r1")


def prompt_of(stage: Stage, question: str):
    """The question as this run's prompt format renders it (data/template.py)."""
    return prompt_for(question, system_prompt(stage), prompt_format(stage))


def sft_row(stage: Stage, question: str, completion: str) -> dict:
    """A prompt-completion SFT row in this run's prompt format (TRL's conversational one for chat)."""
    return {"prompt": prompt_of(stage, question), "completion": completion_for(completion, prompt_format(stage))}


def completion_of(row: dict) -> str:
    if row.get("completion"):
        return row["completion"]
    # `stated`: the answer the cold-start working arrives at, wrong where it slips (data.slip_fraction)
    return render_completion(row["reasoning"], row.get("stated") or row["solution"])


def training_texts(stage: Stage):
    """The cold-start training rows as the model reads them: what the embedded default's tokenizer is
    trained on."""
    system = system_prompt(stage)
    return (render_prompt(row["prompt"], system) + completion_of(row) for row in stage.datasets["train"])


def load_policy(stage: Stage, tokenizer=None):
    """(model, tokenizer) this stage starts from: a fresh preset or a checkpoint / hub model. A fresh
    preset takes `tokenizer` when given (stage 3 retrains the base on text of stage 2's tokenizer)."""
    model_cfg = stage.model_section
    dtype = model_cfg.get("dtype", "float32")
    path = stage.input_path()
    if path is None:
        if tokenizer is None:
            # The embedded default trains its tokenizer offline on the training texts, then the model.
            tokenizer = build_tokenizer(training_texts(stage))
        model = policy.build_from_preset(model_cfg["preset"], model_cfg.get("config"), tokenizer,
                                         seed=model_cfg.get("seed", 0), dtype=dtype)
        return model, tokenizer
    from r1pipeline.hub import model_path

    tokenizer_path = path if stage.init_from != "model" else model_path(model_cfg.get("tokenizer", path))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if prompt_format(stage) == "chat" and not tokenizer.chat_template:
        raise ValueError(f"data.prompt_format = 'chat' but the tokenizer of {tokenizer_path} has no chat template; "
                         "use prompt_format: r1 for a base model")
    return policy.load_pretrained(path, dtype), tokenizer


def unwrapped(model):
    """The model under a LoRA (peft) wrapper, or the model itself."""
    from accelerate.utils import is_peft_model

    return model.get_base_model() if is_peft_model(model) else model


def peft_config(stage: Stage):
    """TRL's `peft_config` from `model.lora` (None: every weight is trained)."""
    return policy.lora_config(stage.model_section.get("lora"))


MASTER_WEIGHTS = "master_weights.safetensors"
BUFFERS = "buffers.safetensors"  # a LoRA checkpoint's model buffers (the routing bias)
ADAPTER_DIR = "adapter"  # final/adapter/: the LoRA adapter alone, beside the merged model


class ExactResumeMixin:
    """Reload checkpoint weights so that every tensor arrives, at full precision.

    transformers' Trainer resumes with a non-strict `load_state_dict` of the saved file. MoE models
    keep their experts fused in memory (`experts.gate_up_proj`) but save them per expert
    (`experts.0.gate_proj.weight`), so those names never match and the experts silently keep their
    pre-resume values. `from_pretrained` converts the names; the strict load then insists.
    With FP8 on, the DeepSeek-V3 format holds e4m3 weights, not the fp32 masters being trained, so
    checkpoints also keep the masters, and a resume loads those."""

    def create_accelerator_and_postprocess(self) -> None:
        from r1pipeline.sharding import enable_fsdp_on_cpu

        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True

    def _load_optimizer_and_scheduler(self, checkpoint):
        from r1pipeline.sharding import load_sharded_optimizer, sharded_checkpoints

        if not (checkpoint and self.is_fsdp_enabled and sharded_checkpoints(self.accelerator)):
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_sharded_optimizer(self.model, self.optimizer, checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))

    def _checkpoint_dir(self, trial) -> Path:
        """The directory the Trainer has just written for this step."""
        return Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"

    def _save_checkpoint(self, model, trial):
        from accelerate.utils import is_peft_model

        super()._save_checkpoint(model, trial)
        if is_peft_model(self.model) and self.args.should_save:
            # The adapter is all a LoRA checkpoint holds; the MoE routing bias is a buffer that training
            # updates (aux-loss-free balancing), so it is kept beside it.
            from safetensors.torch import save_file

            buffers = {name: buffer.detach().contiguous() for name, buffer in self.model.named_buffers()}
            save_file(buffers, str(self._checkpoint_dir(trial) / BUFFERS))
        # Under FSDP the checkpoint holds the sharded parameters, which are the fp32 masters already.
        if getattr(self.model.config, "fp8", False) and self.args.should_save and not self.is_fsdp_enabled:
            from safetensors.torch import save_file

            masters = {name: tensor.detach().contiguous() for name, tensor in self.model.state_dict().items()}
            save_file(masters, str(self._checkpoint_dir(trial) / MASTER_WEIGHTS))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from accelerate.utils import is_peft_model

        model = model if model is not None else self.model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if is_peft_model(model):  # the adapter (transformers loads it exactly), then the buffers
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            buffers = Path(resume_from_checkpoint) / BUFFERS
            if buffers.is_file():
                from safetensors.torch import load_file

                own = dict(model.named_buffers())
                for name, value in load_file(str(buffers)).items():
                    own[name].copy_(value)
            return
        masters = Path(resume_from_checkpoint) / MASTER_WEIGHTS
        if masters.is_file():
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(masters)), strict=True)
            return
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)


class RunDirCallback(TrainerCallback):
    """Marks a checkpoint COMPLETE once every process has written its part, and appends each
    logged step to metrics.jsonl."""

    def __init__(self, stage_dir: Path):
        self.stage_dir = Path(stage_dir)

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        if state.is_world_process_zero:
            rundir.mark_complete(self.stage_dir / f"checkpoint-{state.global_step}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.stage_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def callbacks(stage: Stage, directory: Path | None = None) -> list[TrainerCallback]:
    """The callbacks of a trainer writing into `directory` (default: the stage's directory)."""
    # The routing-bias update first, so that the imbalance it logs reaches metrics.jsonl.
    return [RoutingBiasCallback(), RunDirCallback(directory or stage.stage_dir)]


def read_metrics(stage_dir: Path) -> list[dict]:
    path = Path(stage_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def truncate_metrics(stage_dir: Path, step: int) -> None:
    """After a resume from step N, the lines logged past N by the killed run are replayed: drop them."""
    kept = [row for row in read_metrics(stage_dir) if row["step"] <= step]
    rundir.atomic_write_text(Path(stage_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def train_and_save(trainer, stage: Stage, final: Path | None = None) -> dict:
    """Train (resuming from the newest complete checkpoint in the trainer's output_dir), then write
    `final` (default: the stage's final/) atomically."""
    directory = Path(trainer.args.output_dir)
    checkpoint = rundir.latest_complete_checkpoint(directory)
    if checkpoint is not None:
        step = int(rundir.CHECKPOINT.fullmatch(checkpoint.name).group(1))
        log(f"{stage.name}: resuming from {checkpoint} (step {step})")
        if trainer.is_world_process_zero():
            truncate_metrics(directory, step)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    final = Path(final) if final is not None else stage.stage_dir / "final"
    staging = final.with_name(final.name + ".tmp")
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    save_final(trainer, staging)
    trainer.accelerator.wait_for_everyone()  # sharded saves (FSDP, ZeRO-3) involve every rank
    if trainer.is_world_process_zero():
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    trainer.accelerator.wait_for_everyone()
    return {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}


@contextlib.contextmanager
def generation_ready(model):
    """The model's config with `use_cache` on while it is saved. transformers' Trainer sets it to its
    TrainingArguments' (False: right for training forwards), and a checkpoint saved so makes every
    `generate` outside our stages recompute the whole prefix at each new token (545 s instead of ~22 s
    for 128 x 384 tokens on the embedded default)."""
    configs = [config for config in (getattr(model, "config", None), getattr(model, "generation_config", None))
               if config is not None]
    before = [config.use_cache for config in configs]
    for config in configs:
        config.use_cache = True
    try:
        yield
    finally:
        for config, value in zip(configs, before):
            config.use_cache = value


def save_final(trainer, directory: Path) -> None:
    """The model and the tokenizer, as the next stage and any loader read them: a LoRA run's adapter
    is merged into the base first (and kept alone in final/adapter/), so final/ never needs peft; the
    saved config generates with the KV cache (`generation_ready`)."""
    from accelerate.utils import is_peft_model

    peft, model = is_peft_model(trainer.model), trainer.accelerator.unwrap_model(trainer.model)
    with generation_ready(model.get_base_model() if peft else model):
        _save_final(trainer, directory, peft)


def _save_final(trainer, directory: Path, peft: bool) -> None:
    if trainer.is_fsdp_enabled:  # whatever the checkpoints' state-dict type, final/ is whole
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # every rank takes part
        if trainer.is_world_process_zero():
            # The gathered tensors are copies: tied weights (an embedding shared with the LM head) come
            # back as two tensors, which save_pretrained would write twice. One tensor per tie again:
            first = {}
            for name, param in trainer.model.named_parameters(remove_duplicate=False):
                if id(param) in first and name in state_dict:
                    state_dict[name] = state_dict[first[id(param)]]
                first.setdefault(id(param), name)
            trainer._save(str(directory), state_dict=state_dict)
        return
    if not peft:
        trainer.save_model(str(directory))
        return
    if trainer.is_world_process_zero():
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        peft_model.save_pretrained(str(Path(directory) / ADAPTER_DIR))
        merged = peft_model.merge_and_unload()  # the end of training: the adapter is folded in for good
        merged.save_pretrained(str(directory))
        trainer.processing_class.save_pretrained(str(directory))


def trainer_args(stage: Stage, model, **defaults) -> dict:
    """The stage's TRL fields over our defaults, with the run directory as output_dir."""
    # Under DDP our MoE can leave parameters without gradient in a step (the MTP module outside SFT,
    # experts no token chose); DDP must look for them instead of waiting for their reduction forever.
    # Nor may DDP broadcast rank 0's buffers at every forward (its default): each process counts its own
    # expert loads (all-reduced at the bias update, whose bias is then the same everywhere), and a
    # micro-batch in several forwards (length groups, a shared prefix) can take more forwards on one
    # process than on another, which left the broadcasts unmatched and the run hung.
    moe = isinstance(model, policy.POLICY_CLASS)
    return {"report_to": "none", "ddp_find_unused_parameters": moe, **({"ddp_broadcast_buffers": False} if moe else {}),
            **defaults, **stage.trl_fields, "output_dir": str(stage.stage_dir)}
