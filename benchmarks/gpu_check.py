"""The GPU checks, in one call on a lent GPU machine (../shared/GPU.md: torch 2.11, transformers 5.17,
no TRL, no package registry). Run it through benchmarks/gpu_check.sh, which installs the carried
wheels (.whl/) first. Each part runs in its own process under its own time limit, so that a failure
or a hang costs that part only; each writes benchmarks/results/gpu_<part>.json with the device name.

- fp8:   the real block-FP8 GEMM (torch._scaled_mm, SM90) against our exact emulation (operands
         quantised the same way, fp32 accumulation): relative error at DeepSeek-V3 and mid shapes;
         then FP8 against bf16 GEMM time at those shapes (fp8_mm's own route: the kernel only where
         it measured faster);
- model: our MoE against transformers' DeepseekV3ForCausalLM (bf16, same weights, fwd+bwd, median
         of alternating steps, peak memory) at the tiny benchmark config and a mid config (hidden
         2048, 64 routed experts top-6, 8 layers, sequence 4096);
- grpo:  a short SFT then GRPO of the embedded default with transformers generation, the step
         split into generation / rewards / the rest (benchmarks/grpo_step.py's worker); needs TRL
         and datasets (carried wheels).

`--dry-run` runs every part at toy sizes on whatever device there is (here: the CPU) and writes
into --out, not benchmarks/results/: the CPU tests run it so that the script does not fail on first
contact. `--carry-list` prints the command that downloads the wheels to carry.

    bash benchmarks/gpu_check.sh [--parts fp8,model,grpo] [--dry-run] [--budget 450] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1pipeline import host  # noqa: E402

PARTS = ("fp8", "model", "grpo")
# What the grpo part imports beyond the GPU machine's packages, as PyPI distributions: pure Python, but
# for xxhash (compiled) and multiprocess (a wheel per Python version), fetched for each likely Python.
CARRY = ("trl", "datasets", "dill", "fsspec", "latex2sympy2_extended", "antlr4-python3-runtime")
BINARY_CARRY = ("xxhash", "multiprocess")
CARRY_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
MODULES = {"fp8": ("torch",), "model": ("torch", "transformers"),
           "grpo": ("torch", "transformers", "accelerate", "trl", "datasets", "xxhash", "sympy",
                    "latex2sympy2_extended", "yaml")}
# Per part: the share of the budget it may use (the rest is start-up and margin).
SHARE = {"fp8": 0.2, "model": 0.35, "grpo": 0.35}
MID_CONFIG = dict(vocab_size=32768, hidden_size=2048, intermediate_size=8192, moe_intermediate_size=512,
                  num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
                  q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=1,
                  num_nextn_predict_layers=0, seq_aux_alpha=0.0, max_position_embeddings=4096)
MID_BATCH, MID_SEQ = 1, 4096
# (M, N, K) for the FP8 correctness check: a V3 expert-down shape and the mid config's projections.
FP8_CHECK_SHAPES = [(4096, 7168, 2048), (4096, 2048, 2048), (4096, 1024, 2048)]
DRY_SHAPES = [(64, 256, 256)]


def device_name() -> str:
    found = host.describe()
    return host.name(found) if "gpu" in found else f"CPU: {host.name(found)}"


def versions() -> dict:
    found = {}
    for name in ("torch", "transformers", "trl", "accelerate", "datasets"):
        spec = importlib.util.find_spec(name)
        if spec is not None:
            found[name] = __import__(name).__version__
    return found


def missing(part: str) -> list[str]:
    return [name for name in MODULES[part] if importlib.util.find_spec(name) is None]


# ---- the parts, each in its own process ---------------------------------------------------------


def part_fp8(dry: bool) -> dict:
    import torch

    from benchmarks.model_train import V3_GEMMS, fp8_vs_bf16_gemms
    from r1pipeline.model import fp8

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = DRY_SHAPES if dry else FP8_CHECK_SHAPES
    kernel = device == "cuda" and fp8._scaled_mm_available(torch.zeros(1, device=device))
    checks = []
    for m, n, k in shapes:
        gen = torch.Generator(device=device).manual_seed(m + n + k)
        a = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=device, generator=gen, dtype=torch.bfloat16) * 0.02
        reference = fp8._emulated_mm(a.float(), b.float(), True)
        row = {"M": m, "N": n, "K": k}
        if kernel:
            real = fp8._gpu_blockwise_mm(a, b, True, torch.float32)
            row["relative_error"] = ((real - reference).norm() / reference.norm()).item()
            row["ok"] = row["relative_error"] < 1e-3
        else:
            row["skipped"] = "no SM90 torch._scaled_mm here: the emulation alone runs"
        checks.append(row)
    result = {"fp8_kernel_available": kernel, "correctness": checks}
    if device == "cuda":
        result["fp8_vs_bf16_gemm"] = fp8_vs_bf16_gemms(reps=3 if dry else 10)
        result["gemm_shapes"] = [list(shape) for shape in V3_GEMMS]
    return result


def part_model(dry: bool) -> dict:
    import torch

    from benchmarks import model_train

    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    configs = {"tiny": (model_train.CONFIG, model_train.BATCH, model_train.SEQ),
               "mid": (MID_CONFIG, MID_BATCH, MID_SEQ)}
    if dry:  # the code paths, at toy sizes
        toy = {**model_train.CONFIG, "num_hidden_layers": 2, "n_routed_experts": 16, "n_group": 4, "topk_group": 2}
        configs = {"tiny": (toy, 1, 32), "mid": ({**toy, "hidden_size": 128}, 1, 32)}
    # On the CPU peak memory takes a fresh process per model (model_train.peak_memory_mb), 4 of them, the
    # bulk of a dry run; a GPU measures it in this process, so the dry run there keeps it.
    memory = device == "cuda" or not dry
    return {name: model_train.measure(device, dtype, 2 if dry else 7, config=config, batch=batch, seq=seq,
                                      memory=memory) for name, (config, batch, seq) in configs.items()}


def part_grpo(dry: bool) -> dict:
    from benchmarks import grpo_step

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        sft_steps, prompts, steps = (4, 2, 2) if dry else (300, 16, 6)
        subprocess.run([sys.executable, "-m", "r1pipeline", "--runs-dir", str(runs), "--run", "gpu", "sft",
                        "sft.init_from=model",  # from the preset: no stage 0 base needed for a speed check
                        f"sft.max_steps={sft_steps}", "sft.save_steps=100000", "sft.logging_steps=10",
                        *(["data.num_train=64", "data.num_heldout=8", "sft.per_device_train_batch_size=8"]
                          if dry else [])], cwd=ROOT, check=True, env=child_env())
        sft = runs / "gpu" / "sft" / "final"
        lengths = [24] if dry else [96, 384]
        figures = {}
        for index, length in enumerate(lengths):
            run = grpo_step.run_side("ours", sft, length, index > 0, prompts, 8 if not dry else 4, steps, Path(tmp))
            figures[str(length)] = {**grpo_step.summary([run]), "forced_to_full_length": index > 0}
    return {"sft_steps": sft_steps, "prompts": prompts, "steps": steps, "lengths": figures}


RUNNERS = {"fp8": part_fp8, "model": part_model, "grpo": part_grpo}


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "TOKENIZERS_PARALLELISM": "false"}


def run_part(part: str, dry: bool, out: Path) -> None:
    """In the part's own process: compute, then write gpu_<part>.json."""
    start = time.monotonic()
    result = {"part": part, "device": device_name(), "dry_run": dry, "versions": versions()}
    result.update(RUNNERS[part](dry))
    result["wall_s"] = round(time.monotonic() - start, 1)
    out.write_text(json.dumps(result, indent=2) + "\n")


# ---- the driver ---------------------------------------------------------------------------------


def carry_command(directory: str = ".whl") -> str:
    """The commands that fetch the wheels the GPU machine lacks, at the versions installed here."""
    from importlib.metadata import PackageNotFoundError, version

    def pinned(name):
        try:
            return f"{name}=={version(name)}"
        except PackageNotFoundError:
            return name

    lines = [f"pip download --no-deps -d {directory} " + " ".join(pinned(name) for name in CARRY)]
    for python in CARRY_PYTHONS:
        lines.append(f"pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 "
                     f"--python-version {python} -d {directory} " + " ".join(pinned(n) for n in BINARY_CARRY))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on any device, results into --out")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together")
    parser.add_argument("--out", help="where the JSON files go (default: benchmarks/results/; a dry run: a "
                                      "temporary directory)")
    parser.add_argument("--carry-list", action="store_true", help="print the wheel downloads to carry, and exit")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"--parts {args.parts!r}: unknown {unknown}; known: {', '.join(PARTS)}")
    if args.budget <= 0:
        parser.error(f"--budget {args.budget}: must be > 0 seconds")
    args.parts = parts
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.carry_list:
        print(carry_command())
        return 0
    out = Path(args.out or (tempfile.mkdtemp(prefix="gpu_check_") if args.dry_run else ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    if args.part:  # a child
        run_part(args.part, args.dry_run, out / f"gpu_{args.part}.json")
        return 0
    summary, failed = {}, 0
    for part in args.parts:
        absent = missing(part)
        if absent:
            summary[part] = f"skipped: missing modules {absent} (carry their wheels: --carry-list)"
            print(f"[gpu_check] {part}: {summary[part]}", flush=True)
            continue
        limit = args.budget * SHARE[part] / sum(SHARE[p] for p in args.parts)
        start = time.monotonic()
        command = [sys.executable, __file__, "--part", part, "--out", str(out), "--budget", str(args.budget)]
        try:
            done = subprocess.run(command + (["--dry-run"] if args.dry_run else []), cwd=ROOT, env=child_env(),
                                  timeout=limit)
            summary[part] = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            summary[part] = f"timed out after {limit:.0f} s"
        failed += summary[part] != "ok"
        print(f"[gpu_check] {part}: {summary[part]} in {time.monotonic() - start:.0f} s -> {out / f'gpu_{part}.json'}",
              flush=True)
    (out / "gpu_check.json").write_text(json.dumps({"device": device_name(), "dry_run": args.dry_run,
                                                    "parts": summary}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
