"""Stage 3, rejection-sampling SFT (DeepSeek-R1 §2.3.3): sample k completions per training prompt
from the RL checkpoint, keep the correct ones that pass R1's readability filters (data/filters.py),
at most m per prompt, mix in non-reasoning chat data, and fine-tune the starting model on the result
(R1 retrains the base, not the RL model).

runs/<run>/rejection/ holds, besides the SFT checkpoints:
  samples.jsonl   every sample, appended as it comes: a killed run resumes without re-sampling
  kept.jsonl      the selected samples, each with its provenance
  sft_data.jsonl  what the SFT trains on (selected samples and chat rows)
  selection.json  acceptance by prompt difficulty, what each filter removed; written last
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from transformers import AutoTokenizer

from r1pipeline import rundir
from r1pipeline.config import INIT_FROM_HELP, REWARDS_HELP
from r1pipeline.pipeline import Stage, log
from r1pipeline.schema import defaults, key
from stages import sft
from stages.common import load_policy, prompt_of, sft_row

_POSITIVE = dict(check=lambda n: n >= 1, what="a positive integer")


@dataclasses.dataclass
class Sampling:
    """`rejection.sampling`: how stage 2's checkpoint is sampled (r1pipeline/rollout.py)."""

    num_samples: int = key(4, "completions per prompt", **_POSITIVE)
    max_new_tokens: int = key(128, "longest completion, in tokens", **_POSITIVE)
    temperature: float = key(1.0, "sampling temperature (0: greedy)", check=lambda t: t >= 0, what="a number >= 0")
    top_p: float = key(1.0, "nucleus sampling", check=lambda p: 0 < p <= 1, what="a number in (0, 1]")
    batch_size: int = key(256, "sequences per generation batch", **_POSITIVE)
    num_prompts: int | None = key(None, "training prompts sampled (default: all)", **_POSITIVE)
    seed: int = key(0, "sampling seed")
    backend: str = key("transformers", "transformers | vllm", check=lambda b: b in ("transformers", "vllm"),
                       what="'transformers' or 'vllm'")
    workers: int = key(1, "processes generating batches at once, torch's threads shared out among them "
                          "(transformers backend; vLLM schedules its own)", **_POSITIVE)


def _known_filters(filters: dict) -> bool:
    from data.filters import FILTERS

    return set(filters) <= set(FILTERS) | {"over_long", "dedupe", "max_per_prompt"}


@dataclasses.dataclass
class Options:
    """The stage's own keys; every other key of the `rejection` section is an SFTConfig field."""

    init_from: str = key("model", INIT_FROM_HELP + " to fine-tune (R1 retrains the base)")
    sample_from: str = key("grpo", "the stage name or checkpoint path to sample from")
    rewards: list | None = key(None, REWARDS_HELP + "; a sample is correct when every reward that applies reaches "
                                                    "accept_threshold")
    accept_threshold: float = key(1.0, "reward a sample needs from each applicable reward to count as correct")
    sampling: dict | None = key(None, "num_samples, max_new_tokens, temperature, top_p, batch_size, num_prompts, "
                                      "seed, backend, workers", schema=Sampling)
    filters: dict | None = key(None, "readability filters (data/filters.py) to settings, or false to switch one off",
                               check=_known_filters, what="a mapping of known filters (data/filters.py FILTERS, "
                                                          "over_long, dedupe, max_per_prompt)")
    chat_ratio: float = key(0.1, "share of non-reasoning chat rows in the SFT set", check=lambda r: 0 <= r < 1,
                            what="a number in [0, 1)")


SAMPLING_DEFAULTS = defaults(Sampling)
# R1's filters, on by default; a recipe switches one off with `false`. over_long's default limit is
# the sampling length: a sample cut there never finished.
FILTER_DEFAULTS = {"mixed_language": {"language": "en", "min_share": 0.95}, "long_paragraph": {"max_chars": 1000},
                   "code_in_math": True, "dedupe": True, "max_per_prompt": 2}
DEFAULT_CHAT_RATIO = 0.1


def settings(stage: Stage) -> tuple[dict, dict]:
    """(sampling settings, filter config) with the defaults filled in."""
    section = stage.section
    sampling = {**SAMPLING_DEFAULTS, **(section.get("sampling") or {})}
    filters = {**FILTER_DEFAULTS, "over_long": {"max_tokens": sampling["max_new_tokens"] - 1},
               **(section.get("filters") or {})}
    return sampling, filters


def prompt_id(question: str) -> str:
    return hashlib.sha1(question.encode()).hexdigest()[:16]


def sample(stage: Stage, sampling: dict) -> list[dict]:
    """k completions per training prompt from the sampling checkpoint (resumable: samples.jsonl)."""
    from r1pipeline.rollout import rollout

    train = stage.datasets["train"]
    if sampling["num_prompts"] is not None:
        train = train.select(range(min(int(sampling["num_prompts"]), len(train))))
    rows, seen = [], set()
    keep = [c for c in train.column_names if c not in ("prompt", "reasoning", "completion")]
    for row in train:
        pid = prompt_id(row["prompt"])
        if pid not in seen:  # a dataset may repeat a question: sample it once
            seen.add(pid)
            rows.append({"id": pid, "question": row["prompt"], "prompt": prompt_of(stage, row["prompt"]),
                         **{c: row[c] for c in keep}})
    return rollout(rows, model=stage.sample_path(), num_samples=sampling["num_samples"],
                   max_new_tokens=sampling["max_new_tokens"], temperature=sampling["temperature"],
                   top_p=sampling["top_p"], seed=sampling["seed"], batch_size=sampling["batch_size"],
                   out_path=stage.stage_dir / "samples.jsonl", backend=sampling["backend"],
                   workers=sampling["workers"], desc="rejection: sampling")


def score(stage: Stage, records: list[dict], tokenizer) -> list[dict]:
    """One row per sample with each reward's value and whether it is correct: every reward that
    applies (not None) reaches accept_threshold, and at least one applies."""
    threshold = float(stage.section.get("accept_threshold", 1.0))
    flat = [(record, j, completion) for record in records for j, completion in enumerate(record["completions"])]
    prompts = [record["prompt"] for record, _, _ in flat]
    completions = [completion for _, _, completion in flat]
    skip = {"id", "prompt", "question", "completions", "completion_lengths"}
    columns = {key: [record[key] for record, _, _ in flat] for key in records[0] if key not in skip} if records else {}
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"] if completions else []
    values = {reward.name: reward.fn(prompts, completions, completion_ids=completion_ids, **columns)
              for reward in stage.rewards}
    samples = []
    for i, (record, j, completion) in enumerate(flat):
        mine = {name: values[name][i] for name in values}
        applied = [v for v in mine.values() if v is not None]
        samples.append({"id": record["id"], "question": record["question"], "completion": completion,
                        "sample_index": j, "length": record["completion_lengths"][j], "rewards": mine,
                        "correct": bool(applied) and all(v >= threshold for v in applied),
                        "domain": "code" if record.get("format") else "math",
                        "kind": record.get("kind"), "difficulty": record.get("difficulty", record.get("level"))})
    return samples


def difficulty_bucket(pass_rate: float) -> str:
    """The prompt's difficulty for the sampling model, from its share of correct samples."""
    if pass_rate == 0:
        return "unsolved"
    if pass_rate < 0.5:
        return "hard"
    if pass_rate < 1:
        return "medium"
    return "easy"


def acceptance(samples: list[dict], kept: list[dict]) -> dict:
    """Samples, correct and kept per prompt difficulty (and per the data's own kind/difficulty)."""
    by_prompt = defaultdict(list)
    for s in samples:
        by_prompt[s["id"]].append(s)
    kept_per_prompt = defaultdict(int)
    for s in kept:
        kept_per_prompt[s["id"]] += 1
    tables: dict[str, dict] = {"by_pass_rate": {}}
    for pid, group in by_prompt.items():
        keys = [("by_pass_rate", difficulty_bucket(sum(s["correct"] for s in group) / len(group)))]
        for column in ("difficulty", "kind"):
            if group[0][column] not in (None, ""):
                keys.append((f"by_{column}", str(group[0][column])))
        for table, key in keys:
            row = tables.setdefault(table, {}).setdefault(key, {"prompts": 0, "samples": 0, "correct": 0, "kept": 0})
            row["prompts"] += 1
            row["samples"] += len(group)
            row["correct"] += sum(s["correct"] for s in group)
            row["kept"] += kept_per_prompt[pid]
    for table in tables.values():
        for row in table.values():
            row["acceptance_rate"] = round(row["kept"] / row["samples"], 4)
    return tables


def select(stage: Stage, sampling: dict, filters: dict, tokenizer) -> dict:
    """Sample, score, filter, mix in chat rows; write kept.jsonl, sft_data.jsonl, selection.json."""
    from data.chat import build_chat
    from data.filters import apply_filters

    records = sample(stage, sampling)
    samples = score(stage, records, tokenizer)
    kept, removed = apply_filters(samples, filters)
    if not kept:
        raise RuntimeError(f"{stage.name}: none of the {len(samples)} samples was correct and readable "
                           f"(removed: {removed}); sample more ({stage.name}.sampling.num_samples) or relax "
                           f"{stage.name}.filters / accept_threshold")
    source = {"checkpoint": stage.sample_path(), "hash": stage.input_ref()["sampled_from"]["hash"]}
    rows = [{**sft_row(stage, s["question"], s["completion"]), "origin": "rejection"} for s in kept]
    ratio = float(stage.section.get("chat_ratio", DEFAULT_CHAT_RATIO))
    num_chat = round(len(kept) * ratio / (1 - ratio))
    if num_chat:
        chat = build_chat(num_chat, seed=sampling["seed"])
        rows += [{**sft_row(stage, row["prompt"], row["completion"]), "origin": "chat"} for row in chat]
    random.Random(sampling["seed"]).shuffle(rows)

    lines = "".join(json.dumps({**s, "source": source}) + "\n" for s in kept)
    rundir.atomic_write_text(stage.stage_dir / "kept.jsonl", lines)
    rundir.atomic_write_text(stage.stage_dir / "sft_data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    selection = {"prompts": len(records), "samples": len(samples), "correct": sum(s["correct"] for s in samples),
                 "kept": len(kept), "chat_rows": num_chat, "sft_rows": len(rows), "removed": removed,
                 "acceptance": acceptance(samples, kept), "source": source}
    rundir.atomic_write_json(stage.stage_dir / "selection.json", selection)
    return selection


def run(stage: Stage) -> dict:
    state = PartialState()
    sampling, filters = settings(stage)
    done = stage.stage_dir / "selection.json"
    tokenizer = AutoTokenizer.from_pretrained(stage.sample_path())  # stage 2's: samples are its text
    if state.is_main_process and not done.is_file():
        selection = select(stage, sampling, filters, tokenizer)
        log(f"rejection: kept {selection['kept']} of {selection['samples']} samples "
            f"({selection['correct']} correct; removed {selection['removed']}); "
            f"{selection['chat_rows']} chat rows mixed in")
    state.wait_for_everyone()
    selection = rundir.read_json(done)
    rows = [json.loads(line) for line in (stage.stage_dir / "sft_data.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])

    model, tokenizer = load_policy(stage, tokenizer)
    metrics = sft.train(stage, dataset, model, tokenizer)
    metrics.update({"samples": selection["samples"], "correct": selection["correct"], "kept": selection["kept"],
                    "chat_rows": selection["chat_rows"], "acceptance_rate": selection["kept"] / selection["samples"]})
    metrics.update({f"removed/{name}": count for name, count in selection["removed"].items()})
    return metrics
