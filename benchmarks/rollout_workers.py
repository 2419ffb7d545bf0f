"""Rollout worker processes (`rollout(workers=2)`) against one process, on a trained checkpoint of the
embedded default, through the same `r1pipeline.rollout.rollout` call, in one of two settings: `eval`,
the recipe's held-out problems at the eval section's settings (k = 8, T = 0.6: 200 x 8 samples, 7
batches), or `rejection`, training prompts at stage 3's sampling settings (2 samples each, T = 1.0;
`--num-problems` of them). The workers split the batches (each keeps its own seed), so the fewer the
batches the less they gain. One process decodes with torch's threads
(2 on the 2-core hosts); two workers decode with one thread each. The sides alternate, each figure is
the median of the repetitions, and the samples of every repetition are checked to be the same on both
sides. The workers' start (spawning two processes that import torch) is timed apart: it is paid once
per stage's sampling or per eval, not per batch. Writes benchmarks/results/rollout_workers_<setting>.json.

    python benchmarks/rollout_workers.py --checkpoint runs/default/grpo/final [--setting eval|rejection] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1pipeline import host  # noqa: E402
from r1pipeline.config import load_recipe  # noqa: E402
from r1pipeline.evaluate import check_eval_section, heldout_rows  # noqa: E402
from r1pipeline.rollout import Workers, rollout  # noqa: E402


def timed(rows, checkpoint, workers, settings) -> tuple[float, list]:
    start = time.perf_counter()
    out = rollout(rows, model=checkpoint, workers=workers, desc=f"workers={workers}", **settings)
    return time.perf_counter() - start, [row["completions"] for row in out]


def random_policy(rows) -> str:
    """A freshly initialised tiny policy with a tokenizer of the rows' text, saved to a temporary directory."""
    import tempfile

    from data import build_tokenizer
    from r1pipeline import policy

    tokenizer = build_tokenizer(row["prompt"] + " <think> 12 + 34 = 46 </think> <answer> 46 </answer>" for row in rows)
    directory = tempfile.mkdtemp(prefix="rollout_workers_")
    policy.build_from_preset("tiny", {}, tokenizer, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"no checkpoint given or found: a freshly initialised tiny policy ({directory})", file=sys.stderr)
    return directory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "default" / "grpo" / "final"),
                        help="a trained checkpoint of the embedded default (default: `make all`'s GRPO model; where "
                             "there is none, a freshly initialised tiny policy, whose completions never stop early)")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--setting", choices=("eval", "rejection"), default="eval")
    parser.add_argument("--num-problems", type=int, default=None, help="the first N prompts (default: all)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/rollout_workers_<setting>.json")
    args = parser.parse_args(argv)

    from data import R1_SYSTEM_PROMPT, build_datasets

    recipe = load_recipe(args.recipe)
    data = recipe.get("data") or {}
    datasets = build_datasets(data)
    template = data.get("system_prompt", R1_SYSTEM_PROMPT), data.get("prompt_format", "r1")
    if args.setting == "eval":
        config = check_eval_section(recipe.get("eval"))
        rows = heldout_rows(datasets["heldout"], *template)
        settings = dict(num_samples=config["k"], max_new_tokens=config["max_new_tokens"],
                        temperature=config["temperature"], top_p=config["top_p"], batch_size=config["batch_size"],
                        seed=config["seed"])
    else:
        from stages.rejection import SAMPLING_DEFAULTS

        config = {**SAMPLING_DEFAULTS, **((recipe.get("rejection") or {}).get("sampling") or {})}
        rows = heldout_rows(datasets["train"], *template)
        seen = set()  # each question once, as stage 3 samples them
        rows = [row for row in rows if not (row["prompt"] in seen or seen.add(row["prompt"]))]
        settings = {name: config[name] for name in ("num_samples", "max_new_tokens", "temperature", "top_p",
                                                    "batch_size", "seed")}
    rows = rows[:args.num_problems]
    if not Path(args.checkpoint).is_dir():
        args.checkpoint = random_policy(rows)
    times: dict[str, list[float]] = {"one_process": [], "workers": []}
    reference = None
    start = time.perf_counter()
    with Workers(args.workers) as workers:
        timed(rows[:8], args.checkpoint, workers, settings)  # the workers start and load the checkpoint
        startup = time.perf_counter() - start
        timed(rows[:8], args.checkpoint, 1, settings)  # the same warm-up on this side
        for rep in range(args.reps):
            for side in (("one_process", "workers") if rep % 2 == 0 else ("workers", "one_process")):
                seconds, samples = timed(rows, args.checkpoint, workers if side == "workers" else 1, settings)
                times[side].append(seconds)
                if reference is None:
                    reference = samples
                elif samples != reference:
                    raise SystemExit(f"{side}, repetition {rep}: the samples differ from the first repetition's")
    one, pooled = statistics.median(times["one_process"]), statistics.median(times["workers"])
    result = {
        "benchmark": "rollout worker processes against one process (benchmarks/rollout_workers.py)",
        "host": host.describe(), "torch_threads": torch.get_num_threads(), "checkpoint": args.checkpoint,
        "setting": args.setting, "rows": len(rows), "settings": settings, "workers": repr(workers),
        "one_process_s": times["one_process"], "workers_s": times["workers"],
        "median_one_process_s": round(one, 3), "median_workers_s": round(pooled, 3),
        "speedup": round(one / pooled, 3), "workers_startup_s": round(startup, 2), "same_samples": True,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"rollout_workers_{args.setting}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "host"}, indent=2))


if __name__ == "__main__":
    main()
