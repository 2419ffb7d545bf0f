"""Stage 5, distillation (DeepSeek-R1 §2.4, R1-Distill): SFT of a small dense student on the
reasoning data of stage 3 plus fresh correct samples of the final model, as R1 distilled its data
into Qwen and Llama models (SFT only: "we do not include an RL stage", §2.4).

The student is `distill.student`: a model section of its own (a preset, by default the dense
`tiny-dense`, trained with the teacher's tokenizer, or any HF causal LM by `name_or_path`, which
keeps its own). Fresh samples come from `sample_from` (default: stage 4), scored and filtered as
stage 3 does (stages/rejection.py); stage 3's selected reasoning rows (`data_from`) are added.

With `on_policy` set (a mapping of TRL DistillationConfig fields), the SFT'd student is then trained
on-policy (GKD, arXiv 2306.13649, with TRL's DistillationTrainer): it samples completions to the
training prompts and is moved towards the teacher's next-token distributions on its own samples
(generalised JSD; `beta` 0 forward KL, 1 reverse KL). Student and teacher must share one tokenizer.

runs/<run>/distill/ holds, besides the SFT checkpoints, samples.jsonl, kept.jsonl, sft_data.jsonl
and selection.json as stage 3 writes them (here: the teacher's fresh samples), and
distill_data.jsonl, what the student trains on. With on_policy: sft_final/ (the student after SFT)
and on_policy/ (that phase's checkpoints and metrics.jsonl); final/ is the student after both.
"""

from __future__ import annotations

import dataclasses
import json

from accelerate import PartialState
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DistillationConfig, DistillationTrainer

from r1pipeline import config as cfg
from r1pipeline import rundir
from r1pipeline.pipeline import Stage, log
from r1pipeline.policy import ModelSection
from r1pipeline.schema import key
from stages import rejection, sft
from stages.common import ExactResumeMixin, callbacks, load_policy, peft_config, prompt_of, train_and_save


@dataclasses.dataclass
class Options(rejection.Options):
    """The stage's own keys (stage 3's, with these defaults, and the student's); every other key of the
    `distill` section is an SFTConfig field."""

    init_from: str = key("model", "the student: 'model' (distill.student, trained from its start) or a "
                                  "checkpoint path / hub name")
    sample_from: str = key("align", "the teacher: the stage name or checkpoint path whose fresh samples are "
                                    "distilled")
    student: dict | None = key(None, "the student's model section (preset, name_or_path, config, lora); default "
                                     "preset tiny-dense", schema=ModelSection)
    data_from: str | None = key(None, "a stage whose selected reasoning rows (sft_data.jsonl, origin rejection) "
                                      "are added, R1's 'rejection'; unset: the fresh samples alone",
                                check=lambda ref: ref in ("rejection",), what="'rejection' (stage 3) or unset")
    on_policy: dict | None = key(None, "after SFT, on-policy distillation (TRL DistillationTrainer) with these "
                                       "DistillationConfig fields, e.g. {max_steps: 30, beta: 0.5, learning_rate: "
                                       "1e-4}; the section's bf16 and seed apply unless set; null: SFT only (R1)")


def on_policy_fields(section: dict, fields: dict) -> dict:
    """distill.on_policy as DistillationConfig keyword arguments, the section's bf16 and seed inherited."""
    inherited = {key: section[key] for key in ("bf16", "seed") if key in section}
    return {"report_to": "none", **inherited, **fields}


def check_on_policy(fields: dict, section: dict, output_dir) -> dict:
    """distill.on_policy checked against TRL's DistillationConfig, before any work; returns it coerced."""
    checked = cfg.check_trl_fields("distill", fields, DistillationConfig, "distill.on_policy")
    if checked.get("use_vllm"):
        raise cfg.ConfigError("distill.on_policy.use_vllm = true: the student's on-policy samples are generated with "
                              "transformers here (TRL's vLLM path for it is not wired to our engine); set it false")
    try:
        DistillationConfig(output_dir=str(output_dir), **on_policy_fields(section, checked))
    except (ValueError, TypeError) as exc:
        raise cfg.ConfigError(f"distill.on_policy: {exc}") from None
    return checked


class ResumableDistillationTrainer(ExactResumeMixin, DistillationTrainer):
    pass


def stage_rows(stage: Stage) -> list[dict]:
    """Stage `data_from`'s selected reasoning rows (its chat rows left out: this stage mixes its own)."""
    source = stage.section.get("data_from")
    if not source:
        return []
    path = stage.run_dir / source / "sft_data.jsonl"
    if not path.is_file():  # checked before any work; a missing file here is an outside change
        raise FileNotFoundError(f"distill.data_from = {source!r}: {path} does not exist")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row for row in rows if row.get("origin") == "rejection"]


def check_same_tokenizer(stage: Stage, teacher_tokenizer) -> None:
    """On-policy distillation compares next-token distributions: one vocabulary for both models. A
    preset student takes the teacher's tokenizer; a hub or checkpoint student must already have it."""
    path = stage.input_path()
    if not stage.section.get("on_policy") or path is None:
        return
    student_tokenizer = AutoTokenizer.from_pretrained(path)
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(f"distill.on_policy: the student {path} has another tokenizer than the teacher "
                         f"{stage.sample_path()} ({len(student_tokenizer)} against {len(teacher_tokenizer)} tokens); "
                         "on-policy distillation needs one vocabulary. Set distill.on_policy=null for SFT only")


def on_policy(stage: Stage, student_path, tokenizer) -> dict:
    """Phase 2: the SFT'd student trained on its own samples towards the teacher's distributions."""
    from r1pipeline import policy

    directory = stage.stage_dir / "on_policy"
    directory.mkdir(parents=True, exist_ok=True)
    dtype = stage.model_section.get("dtype", "float32")
    student = policy.load_pretrained(str(student_path), dtype)
    teacher = policy.load_pretrained(stage.sample_path(), dtype)
    tokenizer.padding_side = "left"  # the trainer generates from left-padded prompts
    prompts = Dataset.from_list([{"prompt": prompt_of(stage, row["prompt"])} for row in stage.datasets["train"]])
    args = DistillationConfig(**on_policy_fields(stage.section, stage.section["on_policy"]),
                              output_dir=str(directory))
    trainer = ResumableDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                           processing_class=tokenizer, callbacks=callbacks(stage, directory),
                                           peft_config=peft_config(stage))
    log(f"distill: on-policy distillation from {stage.sample_path()}, {args.max_steps} steps, beta {args.beta}")
    metrics = train_and_save(trainer, stage)
    return {f"on_policy/{key}": value for key, value in metrics.items()}


def run(stage: Stage) -> dict:
    state = PartialState()
    sampling, filters = rejection.settings(stage)
    teacher_tokenizer = AutoTokenizer.from_pretrained(stage.sample_path())
    check_same_tokenizer(stage, teacher_tokenizer)
    if state.is_main_process and not (stage.stage_dir / "selection.json").is_file():
        selection = rejection.select(stage, sampling, filters, teacher_tokenizer)
        log(f"distill: kept {selection['kept']} of {selection['samples']} fresh samples of {stage.sample_path()}")
    state.wait_for_everyone()
    selection = rundir.read_json(stage.stage_dir / "selection.json")
    fresh = [json.loads(line) for line in (stage.stage_dir / "sft_data.jsonl").read_text().splitlines()]
    rows = [{**row, "origin": "stage3"} for row in stage_rows(stage)] + fresh
    if state.is_main_process:
        rundir.atomic_write_text(stage.stage_dir / "distill_data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])

    two_phases = bool(stage.section.get("on_policy"))
    sft_final = stage.stage_dir / ("sft_final" if two_phases else "final")
    phase_metrics = stage.stage_dir / "sft_metrics.json"  # for a resumed run that skips the finished SFT
    if two_phases and sft_final.is_dir():
        metrics = rundir.read_json(phase_metrics) if phase_metrics.is_file() else {}
        tokenizer = AutoTokenizer.from_pretrained(sft_final)
    else:
        model, tokenizer = load_policy(stage, teacher_tokenizer)
        size = sum(p.numel() for p in model.parameters())
        log(f"distill: student {type(model).__name__}, {size:,} parameters, "
            f"on {len(rows)} rows ({len(rows) - len(fresh)} from stage 3, {selection['kept']} fresh, "
            f"{selection['chat_rows']} chat)")
        metrics = {**sft.train(stage, dataset, model, tokenizer, sft_final), "student_parameters": size}
        del model
        if two_phases and state.is_main_process:
            rundir.atomic_write_json(phase_metrics, metrics)
    if two_phases:
        metrics.update(on_policy(stage, sft_final, tokenizer))
    metrics.update({"rows": len(rows), "fresh_kept": selection["kept"], "fresh_samples": selection["samples"]})
    return metrics
