"""How far the embedded default's training is from what its arithmetic needs on this host.

1. One training step of the recipe's policy on an SFT-sized batch (32 rows x 80 tokens: forward, backward,
   fused AdamW), its floating-point operations counted by torch's FlopCounterMode, against the time it
   takes and against this host's fp32 GEMM rate: a 2048^3 matmul, and a GEMM of the policy's own shape
   (2560 x 256 x 512). Their ratio is the most any rewrite of the step's code could buy at fp32.
2. With `--run` (a finished `make all` run directory): the whole run's training arithmetic from its
   stages' token counts, the time that arithmetic alone needs at the 2048^3 GEMM rate, and the stages'
   measured wall times. Every term counts no more than the run computed, so the time is a lower bound:
   SFT-type stages (1, 3, 5) count TRL's `num_tokens` less, in every row, the tokens all rows share
   (system prompt and "User: ", which our trainer computes once per batch); stage 0 its packed tokens;
   the RL stages (2, 4) their completion tokens only (generation, training, and stage 4's reference
   forward; prompts, which each group computes once, not at all); stage 3's and 5's sampling, the
   reward model and the evaluation are left out.

Writes benchmarks/results/make_all_arithmetic.json.

    python benchmarks/make_all_arithmetic.py [--run runs/default] [--reps 15]

(`make bench` runs it without `--run`: part 2 then reads runs/default where `make all` has finished there.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1pipeline import host  # noqa: E402
from r1pipeline.config import load_recipe  # noqa: E402
from r1pipeline.model import R1MoEConfig, R1MoEForCausalLM  # noqa: E402
from r1pipeline.model.checkpoint import config_from_checkpoint  # noqa: E402
from r1pipeline.pipeline import preset_config  # noqa: E402

RECIPE = ROOT / "recipes" / "tiny.yaml"
BATCH, LENGTH = 32, 80       # an SFT micro-batch of the embedded default (~87 tokens a row, less the shared prefix)
SFT_TYPE, RL = ("sft", "rejection", "distill"), ("grpo", "align")
STAGES = ("base", *SFT_TYPE, *RL)  # the stages whose training the bound counts


def policy_config(vocab_size: int = 512) -> R1MoEConfig:
    """The recipe's policy (its preset under its `model.config`), at the embedded tokenizer's size."""
    model = load_recipe(str(RECIPE))["model"]
    tokens = {"vocab_size": vocab_size, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    return preset_config({**model, "config": {**(model.get("config") or {}), **tokens}})


def step_flops(config: R1MoEConfig, length: int = LENGTH, batch: int = BATCH, train: bool = True) -> float:
    """FLOPs of one forward (train=False) or training step (forward, backward, optimizer) of a fresh model."""
    torch.manual_seed(0)
    model = R1MoEForCausalLM(config).train(train)
    ids = torch.randint(3, config.vocab_size, (batch, length))
    with FlopCounterMode(display=False) as counter:
        if train:
            model(input_ids=ids, labels=ids).loss.backward()
        else:
            with torch.no_grad():
                model(input_ids=ids)
    return float(counter.get_total_flops())


def gemm_rate(m: int, k: int, n: int, reps: int) -> float:
    """FLOP/s of an fp32 [m, k] x [k, n] product on this host's threads (median of `reps`)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / sorted(times)[len(times) // 2]


def timed_step(config: R1MoEConfig, reps: int) -> float:
    """Median seconds of a training step (forward, backward, fused AdamW) of the recipe's policy."""
    torch.manual_seed(0)
    model = R1MoEForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(3, config.vocab_size, (BATCH, LENGTH))
    times = []
    for index in range(reps + 3):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if index >= 3:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def shared_prefix_tokens(run: Path) -> int:
    """Tokens every rendered prompt of the run starts with (system prompt, "User: "), less one (the last
    may merge with the question's first characters)."""
    from transformers import AutoTokenizer

    from data.template import USER_PREFIX

    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    system = manifest["config"]["data"].get("system_prompt")
    tokenizer = AutoTokenizer.from_pretrained(run / "sft" / "final")
    text = f"{system}\n{USER_PREFIX}" if system else USER_PREFIX
    return max(0, len(tokenizer(text)["input_ids"]) - 1)


def run_arithmetic(run: Path, rate: float) -> dict:
    """Per stage: the tokens counted, the FLOPs, the seconds they need at `rate`, the stage's wall time."""
    configs = {stage: config_from_checkpoint(json.loads((run / stage / "final" / "config.json").read_text()))
               for stage in ("sft", "distill")}
    train = {name: step_flops(config) / (BATCH * LENGTH) for name, config in configs.items()}
    forward = step_flops(configs["sft"], train=False) / (BATCH * LENGTH)
    shared = shared_prefix_tokens(run)
    stages = {}
    for stage in STAGES:
        manifest = json.loads((run / stage / "manifest.json").read_text())
        section = manifest["config"][stage]
        rows = metrics(run / stage)
        steps = int(section["max_steps"])
        batch = int(section["per_device_train_batch_size"])
        per_token = train["distill" if stage == "distill" else "sft"]
        if stage in RL:
            tokens = sum(row["completions/mean_length"] * batch for row in rows if "completions/mean_length" in row)
            passes = per_token + forward + (forward if float(section.get("beta") or 0) else 0.0)
            flops, counted = tokens * passes, "completion tokens: generation, training" + (
                ", reference forward" if float(section.get("beta") or 0) else "")
        else:
            total = max(row["num_tokens"] for row in rows if "num_tokens" in row)
            tokens = total if stage == "base" else total - steps * batch * shared
            flops, counted = tokens * per_token, "packed tokens" if stage == "base" else \
                f"num_tokens less {shared} shared prompt tokens a row"
        stages[stage] = {"tokens": int(tokens), "counted": counted, "gflop": round(flops / 1e9, 3),
                         "seconds_at_gemm_rate": round(flops / rate, 1),
                         "wall_s": round(float(manifest["wall_time_s"]), 1)}
    flops = sum(value["gflop"] for value in stages.values()) * 1e9
    wall = sum(value["wall_s"] for value in stages.values())
    return {"run": str(run), "mflop_per_training_token": {k: round(v / 1e6, 2) for k, v in train.items()},
            "mflop_per_forward_token": round(forward / 1e6, 2), "shared_prompt_tokens": shared, "stages": stages,
            "total_tflop": round(flops / 1e12, 1), "lower_bound_s": round(flops / rate, 1),
            "stages_wall_s": round(wall, 1), "wall_over_lower_bound": round(wall / (flops / rate), 2)}


def unfinished(run: Path) -> list[str]:
    return [stage for stage in STAGES if not (run / stage / "manifest.json").exists()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished `make all` run directory (runs/<name>) for part 2 (default: "
                                      "runs/default if finished)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "make_all_arithmetic.json"))
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: at least 1")
    run = Path(args.run) if args.run else ROOT / "runs" / "default"
    if args.run and (missing := unfinished(run)):
        parser.error(f"--run {run}: no finished stage(s) {', '.join(missing)} there (run `make all` first)")
    if not args.run and unfinished(run):
        print(f"{run}: no finished `make all` there, so the training step only (part 1)", file=sys.stderr)
        run = None
    config = policy_config()
    flops = step_flops(config)
    seconds = timed_step(config, args.reps)
    big = gemm_rate(2048, 2048, 2048, max(args.reps // 3, 3))
    own = gemm_rate(BATCH * LENGTH, config.hidden_size, config.intermediate_size, args.reps * 10)
    record = {"benchmark": "make all's arithmetic against its time (benchmarks/make_all_arithmetic.py)",
              "host": host.describe(), "threads": torch.get_num_threads(),
              "training_step": {"batch": BATCH, "length": LENGTH, "gflop": round(flops / 1e9, 2),
                                "seconds": round(seconds, 4), "gflop_per_s": round(flops / seconds / 1e9, 1)},
              "gemm_gflop_per_s": {"2048x2048x2048": round(big / 1e9, 1),
                                   f"{BATCH * LENGTH}x{config.hidden_size}x{config.intermediate_size}":
                                       round(own / 1e9, 1)},
              "step_share_of_gemm_rate": round(flops / seconds / big, 3)}
    if run is not None:
        record["run"] = run_arithmetic(run, big)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
