"""Grouped-rollout throughput: vLLM (its CPU build here, in this process) against transformers'
`generate`, through the same `r1pipeline.rollout.rollout` call, on the same tiny-vllm checkpoint.

Settings: the embedded default's GRPO step (16 prompts x G = 8, 96 new tokens, its rendered addition
prompts) and a longer one (4 prompts x 8, 384 new tokens). A third column, `transformers_tiny`, runs
transformers on the `tiny` preset (MLA latent 64 instead of 512), the embedded default's policy: what
switching the default to tiny-vllm + vLLM would be measured against. The checkpoint is freshly initialised, so
completions rarely stop early; throughput counts the tokens each engine actually generated. The two
engines alternate within the run and each figure is the median of the repetitions, so machine load
hits both alike. vLLM's start-up is timed apart (it is paid once per stage or eval, not per batch).
Writes benchmarks/results/rollout.json.

    python benchmarks/rollout.py [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import build_tokenizer, render_prompt  # noqa: E402
from data.synthetic import generate_problem  # noqa: E402
from r1pipeline import host, policy, vllm_engine  # noqa: E402
from r1pipeline.rollout import rollout  # noqa: E402

SYSTEM = "Think step by step inside <think> </think>, then give the answer inside <answer> </answer>."
BACKENDS = {"transformers": "transformers", "vllm": "vllm", "transformers_tiny": "transformers"}  # column: engine
SETTINGS = {  # name: (prompts, G, new tokens)
    "embedded_default_grpo_step": (16, 8, 96),
    "long_completions": (4, 8, 384),
}


def prompts(count: int) -> list[dict]:
    rng = random.Random(1)
    return [{"id": str(i), "prompt": render_prompt(generate_problem("add", rng)["prompt"], SYSTEM)}
            for i in range(count)]


def timed(rows, *, model, tokenizer, backend, samples, new_tokens) -> tuple[float, int]:
    start = time.perf_counter()
    out = rollout(rows, model=model, tokenizer=tokenizer, backend=backend, num_samples=samples,
                  max_new_tokens=new_tokens, temperature=1.0, batch_size=len(rows) * samples, seed=0,
                  desc=backend)
    return time.perf_counter() - start, sum(sum(row["completion_lengths"]) for row in out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout.json"))
    args = parser.parse_args()

    rows = prompts(max(count for count, _, _ in SETTINGS.values()))
    tokenizer = build_tokenizer(row["prompt"] + " <think> 12 + 34 = 46 </think> <answer> 46 </answer>" for row in rows)
    with tempfile.TemporaryDirectory() as directory:
        model = policy.build_from_preset("tiny-vllm", {}, tokenizer, seed=0)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        model = policy.load_pretrained(directory).eval()
        tiny = policy.build_from_preset("tiny", {}, tokenizer, seed=0).eval()
        start = time.perf_counter()
        llm = vllm_engine.build_llm(directory, seed=0)
        engine_start_s = time.perf_counter() - start
        results = {}
        for name, (count, samples, new_tokens) in SETTINGS.items():
            batch = rows[:count]
            engines = {"transformers": model, "vllm": llm, "transformers_tiny": tiny}
            for column, engine in engines.items():  # warm-up: first-call allocations, oneDNN primitives
                timed(batch[:1], model=engine, tokenizer=tokenizer, backend=BACKENDS[column], samples=2, new_tokens=4)
            runs = {column: [] for column in engines}
            for _ in range(args.reps):
                for column, engine in engines.items():
                    runs[column].append(timed(batch, model=engine, tokenizer=tokenizer, backend=BACKENDS[column],
                                             samples=samples, new_tokens=new_tokens))
            speed = {backend: statistics.median(tokens / seconds for seconds, tokens in reps)
                     for backend, reps in runs.items()}
            results[name] = {
                "prompts": count, "G": samples, "max_new_tokens": new_tokens,
                "tokens_per_s": {backend: round(value, 1) for backend, value in speed.items()},
                "generated_tokens": {backend: [tokens for _, tokens in reps] for backend, reps in runs.items()},
                "seconds": {backend: [round(seconds, 2) for seconds, _ in reps] for backend, reps in runs.items()},
                "vllm_over_transformers": round(speed["vllm"] / speed["transformers"], 2),
                "vllm_over_transformers_tiny": round(speed["vllm"] / speed["transformers_tiny"], 2),
                "faster": max(("vllm", "transformers"), key=speed.get),
            }
            print(f"{name}: vLLM {speed['vllm']:.0f} tok/s, transformers {speed['transformers']:.0f} tok/s "
                  f"(tiny preset: {speed['transformers_tiny']:.0f}), ratio {speed['vllm'] / speed['transformers']:.2f}",
                  flush=True)
        vllm_engine.shutdown(llm)
    record = {
        "benchmark": "grouped rollouts, vLLM vs transformers generate (benchmarks/rollout.py)",
        "model": "tiny-vllm preset (MLA kv_lora_rank 512 + rope 64), fp32, random init",
        "vllm": vllm_engine.vllm_version(), "torch": torch.__version__,
        "vllm_engine_start_s": round(engine_start_s, 1),
        "machine": {**host.describe(), "torch_threads": torch.get_num_threads()},
        "reps": args.reps, "settings": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
