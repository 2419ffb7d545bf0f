"""Stage 5, distillation (DeepSeek-R1 §2.4, R1-Distill): SFT of a small dense student on the
reasoning data of stage 3 plus fresh correct samples of the final model, as R1 distilled its data
into Qwen and Llama models (SFT only: "we do not include an RL stage", §2.4).

The student is `distill.student`: a model section of its own (a preset, by default the dense
`tiny-dense`, trained with the teacher's tokenizer, or any HF causal LM by `name_or_path`, which
keeps its own). Fresh samples come from `sample_from` (default: stage 4), scored and filtered as
stage 3 does (stages/rejection.py); stage 3's selected reasoning rows (`data_from`) are added.

runs/<run>/distill/ holds, besides the SFT checkpoints, samples.jsonl, kept.jsonl, sft_data.jsonl
and selection.json as stage 3 writes them (here: the teacher's fresh samples), and
distill_data.jsonl, what the student trains on.
"""

from __future__ import annotations

import dataclasses
import json

from accelerate import PartialState
from datasets import Dataset
from transformers import AutoTokenizer

from r1pipeline import rundir
from r1pipeline.pipeline import Stage, log
from r1pipeline.policy import ModelSection
from r1pipeline.schema import key
from stages import rejection, sft
from stages.common import load_policy


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
    data_from: str | None = key("rejection", "a stage whose selected reasoning rows (sft_data.jsonl, origin "
                                             "rejection) are added; null for the fresh samples alone")


def stage_rows(stage: Stage) -> list[dict]:
    """Stage `data_from`'s selected reasoning rows (its chat rows left out: this stage mixes its own)."""
    source = stage.section.get("data_from", "rejection")
    if not source:
        return []
    path = stage.run_dir / source / "sft_data.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"distill.data_from = {source!r}: {path} does not exist; run that stage first, "
                                "or set distill.data_from=null")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row for row in rows if row.get("origin") == "rejection"]


def run(stage: Stage) -> dict:
    state = PartialState()
    sampling, filters = rejection.settings(stage)
    teacher_tokenizer = AutoTokenizer.from_pretrained(stage.sample_path())
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

    model, tokenizer = load_policy(stage, teacher_tokenizer)
    size = sum(p.numel() for p in model.parameters())
    log(f"distill: student {type(model).__name__}, {size:,} parameters, "
        f"on {len(rows)} rows ({len(rows) - len(fresh)} from stage 3, {selection['kept']} fresh, "
        f"{selection['chat_rows']} chat)")
    metrics = sft.train(stage, dataset, model, tokenizer)
    metrics.update({"student_parameters": size, "rows": len(rows),
                    "fresh_kept": selection["kept"], "fresh_samples": selection["samples"]})
    return metrics
