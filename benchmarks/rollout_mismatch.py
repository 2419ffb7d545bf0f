"""Train/rollout mismatch baseline: GRPO with vLLM rollouts (the CPU build, colocated, fp32) on the
embedded default's task, and how far the engine's logprobs of the tokens it sampled are from the
trainer's recomputation of them, every step.

Runs `python -m r1pipeline sft grpo` on recipes/tiny.yaml with the tiny-vllm preset, a 300-step SFT
and 20 GRPO steps (16 prompts x 8, 96 new tokens), then summarises grpo/metrics.jsonl: TRL's
`sampling/sampling_logp_difference/{mean,max}` and our `sampling/kl_k3`. This is the figure MoE
routing replay is to improve on. Writes benchmarks/results/rollout_mismatch.json.

    python benchmarks/rollout_mismatch.py [--grpo-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1pipeline import host  # noqa: E402

KEYS = {"mean_abs_dlogp": "sampling/sampling_logp_difference/mean",
        "max_abs_dlogp": "sampling/sampling_logp_difference/max", "k3_kl": "sampling/kl_k3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--grpo-steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout_mismatch.json"))
    args = parser.parse_args()
    overrides = ["model.preset=tiny-vllm", f"sft.max_steps={args.sft_steps}", "sft.save_steps=1000",
                 "grpo.use_vllm=true", f"grpo.max_steps={args.grpo_steps}", "grpo.save_steps=1000"]
    with tempfile.TemporaryDirectory() as runs:
        command = [sys.executable, "-m", "r1pipeline", "--runs-dir", runs, "--run", "mismatch"]
        start = time.monotonic()
        for stage in ("sft", "grpo"):
            subprocess.run([*command, stage, *overrides], cwd=ROOT, check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.monotonic() - start
        rows = [json.loads(line) for line in (Path(runs) / "mismatch" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if KEYS["k3_kl"] in row]
    per_step = {name: [row[key] for row in steps] for name, key in KEYS.items()}
    record = {
        "benchmark": "train/rollout mismatch with vLLM rollouts (benchmarks/rollout_mismatch.py)",
        "setup": {"recipe": "tiny", "overrides": overrides, "engine": "vLLM 0.31.0 CPU build, colocated, fp32",
                  "group": "16 prompts x 8, 96 new tokens, temperature 1.0"},
        "steps": len(steps),
        "mean_over_steps": {name: statistics.mean(values) for name, values in per_step.items() if name != "max_abs_dlogp"},
        "max_abs_dlogp_any_step": max(per_step["max_abs_dlogp"]),
        "per_step": per_step,
        "reward_per_step": [row.get("reward") for row in steps],
        "wall_s_sft_and_grpo": round(wall, 1),
        "machine": host.describe(),
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("steps", "mean_over_steps", "max_abs_dlogp_any_step")}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
