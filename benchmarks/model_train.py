"""Training speed of our DeepSeek-V3 policy vs transformers' DeepseekV3ForCausalLM, across shapes.

Same config, same weights (ours saved, theirs loaded from that checkpoint), forward + backward of a
causal-LM loss. The models alternate within one run and each figure is the median of the
repetitions, so machine load hits all alike. transformers runs with each of its CPU-capable experts
implementations; the faster, raced at each shape, is the baseline.

Shapes: the reference config (4 layers, 3 MoE, 64 experts top-6, 4x256 tokens), and a grid over
hidden 256-1024, 8-64 routed experts, top-2 to top-8, 1k-8k tokens a batch, group-limited routing off
and on: a 2^(5-1) fractional factorial (every factor at both ends, every pair of factors at all four
pairs of ends; group-limited = the parity of the other four) plus its centre. The grid's models are
two MoE layers (V3 is 58 MoE layers of 61). The slowest point is the figure. Per point, the share of
each model's step spent in GEMM kernels (mm, bmm, addmm, grouped_mm: torch.profiler self time) says
how much of it the two share: both run the same torch GEMMs.
Peak memory: what one training step adds to the model's own memory — the increase of peak RSS in a
fresh process per model (CPU), or torch.cuda.max_memory_allocated (GPU). On a GPU it also times block-FP8 vs bf16 GEMMs at
DeepSeek-V3 shapes. Writes benchmarks/results/model_train.json.

    python benchmarks/model_train.py [--reps 7] [--points reference,grid]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1pipeline import host  # noqa: E402
from r1pipeline.model import R1MoEConfig, R1MoEForCausalLM  # noqa: E402
from r1pipeline.model.fp8 import fp8_mm  # noqa: E402

# MoE-dominated: 64 fine-grained experts (top-6, V3's 8 groups / 4 kept) in 3 of 4 layers; no MTP and
# no balance loss, which transformers does not have.
CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
              num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
              q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
              n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=1,
              num_nextn_predict_layers=0, seq_aux_alpha=0.0, max_position_embeddings=1024)
BATCH, SEQ = 4, 256
TRANSFORMERS_EXPERTS = ("eager", "grouped_mm")
# The grid's factors, each at its two ends; the centre point sits between them.
GRID = {"hidden": (256, 1024), "experts": (8, 64), "top_k": (2, 8), "tokens": (1024, 8192), "grouped": (False, True)}
CENTRE = {"hidden": 512, "experts": 16, "top_k": 4, "tokens": 4096, "grouped": True}
GRID_LAYERS, GRID_SEQ = 2, 512  # tokens = batch x 512
GRID_BUDGET_S, MAX_REPS = 30, 15  # per grid point: the repetitions of the timed pair that fit 30 s, 3 to 15
GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm")
# DeepSeek-V3 GEMM shapes (tokens M, out N, in K): q_b, kv_a (bf16 there), o_proj, expert up, expert down.
V3_GEMMS = [(4096, 24576, 1536), (4096, 7168, 16384), (4096, 4096, 7168), (4096, 2048, 7168), (4096, 7168, 2048)]


def grid_points() -> list[dict]:
    """The 2^(5-1) design (grouped = parity of the other four factors' ends: resolution V) and its centre."""
    points = []
    for ends in itertools.product((0, 1), repeat=4):
        point = {name: GRID[name][end] for name, end in zip(("hidden", "experts", "top_k", "tokens"), ends)}
        points.append({**point, "grouped": GRID["grouped"][sum(ends) % 2]})
    return points + [CENTRE]


def grid_shape(hidden, experts, top_k, tokens, grouped) -> tuple[dict, int, int]:
    """(config, batch, seq) of a grid point. Widths scale with hidden as in the reference config (64-wide
    heads of 32 nope + 32 rope dims, q/kv latents hidden/2 and hidden/4), experts hidden/4 wide (V3:
    2048 of 7168).
    Group-limited routing keeps half of min(8, E/2) groups, or more where top-k needs them (top-8 of
    8 experts keeps every group: the group code runs, the choice is not limited)."""
    groups = min(8, experts // 2) if grouped else 1
    per_group = experts // groups
    keep = max(groups // 2, -(-top_k // per_group)) if grouped else 1
    seq = min(tokens, GRID_SEQ)
    config = dict(CONFIG, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 4,
                  num_hidden_layers=GRID_LAYERS, first_k_dense_replace=0, num_attention_heads=hidden // 64,
                  num_key_value_heads=hidden // 64, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4,
                  n_routed_experts=experts, num_experts_per_tok=top_k, n_group=groups, topk_group=keep,
                  max_position_embeddings=seq)
    return config, tokens // seq, seq


def build(device, dtype, directory, config=CONFIG):
    """Our model and transformers' with identical weights: {name: model}."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # a mid-size config initialises in seconds on a GPU, minutes on its CPU
        ours = R1MoEForCausalLM(R1MoEConfig(**config)).to(dtype)
    ours.save_pretrained(directory)
    models = {"ours": ours.to(device, dtype).train()}
    for impl in TRANSFORMERS_EXPERTS:
        theirs = DeepseekV3ForCausalLM.from_pretrained(directory, dtype=dtype).to(device).train()
        theirs.set_experts_implementation(impl)
        models[f"transformers_{impl}"] = theirs
    return models


def step(model, batch):
    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch, use_cache=False).loss.backward()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(models, batch, reps, device, budget_s=None):
    """Each model's step times, alternating. With `budget_s`, at least `reps` repetitions and more (up
    to MAX_REPS) where the steps are short enough to fit the budget: short steps are noisier."""
    warm = time.perf_counter()
    for model in models.values():  # warm-up
        step(model, batch)
    if budget_s:
        reps = max(reps, min(MAX_REPS, int(budget_s / (time.perf_counter() - warm))))
    times = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            sync(device)
            start = time.perf_counter()
            step(model, batch)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def gemm_share(model, batch) -> float:
    """Share of one training step's CPU time spent in GEMM kernels (profiler self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / total


def fresh(name, device, dtype, config=CONFIG):
    """A randomly initialised model of `name` (weights do not change memory use)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    with torch.device(device):
        if name == "ours":
            return R1MoEForCausalLM(R1MoEConfig(**config)).to(dtype).train()
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).to(dtype).train()
    model.set_experts_implementation(name.removeprefix("transformers_"))
    return model


def peak_memory_mb(name, device, dtype, config=CONFIG, batch=BATCH, seq=SEQ) -> float:
    """Peak memory a training step adds to the model: in a fresh process on CPU (peak RSS), in this
    one on a GPU (max_memory_allocated)."""
    if device == "cpu":
        out = subprocess.run([sys.executable, __file__, "--memory-of", name, "--shape",
                              json.dumps({"config": config, "batch": batch, "seq": seq})],
                             capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    model = fresh(name, device, dtype, config)
    batch = torch.randint(0, config["vocab_size"], (batch, seq), device=device)
    step(model, batch)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(model, batch)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's VmHWM belongs to the process image, while ru_maxrss keeps the
    parent's peak across fork + exec."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(l for l in status.read_text().splitlines() if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(name, shape):
    config, batch, seq = shape["config"], shape["batch"], shape["seq"]
    model = fresh(name, "cpu", torch.float32, config)
    batch = torch.randint(0, config["vocab_size"], (batch, seq))
    base = peak_rss_mb()
    step(model, batch)
    print(peak_rss_mb() - base)


def fp8_vs_bf16_gemms(reps=10):
    """Median ms of block-FP8 (fp8_mm: the real kernel where it measured faster, else emulation) vs bf16."""
    results = []
    for m, n, k in V3_GEMMS:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * 0.02
        row = {"M": m, "N": n, "K": k}
        for label, fn in (("bf16_ms", lambda: a @ b), ("fp8_ms", lambda: fp8_mm(a, b, b_blocks=True))):
            fn()
            times = []
            for _ in range(reps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            row[label] = statistics.median(times) * 1e3
        row["fp8_speedup"] = row["bf16_ms"] / row["fp8_ms"]
        results.append(row)
    return results


def measure(device, dtype, reps, config=CONFIG, batch=BATCH, seq=SEQ, memory=True, shares=False, race_reps=2,
            budget_s=None):
    """Step time of ours against transformers' fastest implementation, and (with `memory`) each one's
    peak memory, (with `shares`) each one's GEMM share."""
    with tempfile.TemporaryDirectory() as d:
        models = build(device, dtype, d, config)
    shape = (batch, seq)
    batch = torch.randint(0, config["vocab_size"], shape, device=device)
    load_before = os.getloadavg()[0]
    # transformers' implementations are first raced against each other (interleaved, `race_reps`
    # repetitions); the fastest then alternates with ours for the full count.
    race = time_interleaved({n: m for n, m in models.items() if n != "ours"}, batch, race_reps, device,
                            budget_s and budget_s / 2)
    probe = {name: statistics.median(t) for name, t in race.items()}
    fastest = min(probe, key=probe.get)
    times = time_interleaved({"ours": models["ours"], fastest: models[fastest]}, batch, reps, device, budget_s)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    load_after = os.getloadavg()[0]
    tokens = shape[0] * shape[1]
    figures = {name: {"tokens_per_s": tokens / s, "step_ms": s * 1e3} for name, s in seconds.items()}
    for name in figures if memory else ():
        figures[name]["peak_memory_mb"] = peak_memory_mb(name, device, dtype, config, *shape)
    for name in figures if shares and device == "cpu" else ():
        figures[name]["gemm_share"] = gemm_share(models[name], batch)
    baseline = fastest
    return {
        "device": host.name(),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "load_average_1min": [load_before, load_after],
        "repetitions": len(times["ours"]),
        "transformers_race_step_ms": {name: s * 1e3 for name, s in probe.items()},
        "models": figures,
        "baseline": baseline,
        "speedup_vs_baseline": figures["ours"]["tokens_per_s"] / figures[baseline]["tokens_per_s"],
    }


def grid(reps) -> dict:
    """Every grid point, ours against transformers' faster kernel there; the slowest point is the figure."""
    rows, points = [], grid_points()
    for n, point in enumerate(points, 1):
        config, batch, seq = grid_shape(**point)
        started = time.perf_counter()
        m = measure("cpu", torch.float32, reps, config, batch, seq, shares=True, race_reps=1, budget_s=GRID_BUDGET_S)
        rows.append({**point, "batch": batch, "seq_len": seq, "n_group": config["n_group"],
                     "topk_group": config["topk_group"], "baseline": m["baseline"],
                     "speedup_vs_baseline": m["speedup_vs_baseline"], "models": m["models"],
                     # The ratio were ours nothing but its GEMMs, which both models share: the ceiling
                     # of any speed-up that leaves the GEMMs as they are.
                     "ceiling_same_gemms": m["speedup_vs_baseline"] / m["models"]["ours"]["gemm_share"],
                     "repetitions": m["repetitions"], "transformers_race_step_ms": m["transformers_race_step_ms"],
                     "load_average_1min": m["load_average_1min"]})
        print(f"[{n}/{len(points)}] {point}: {m['speedup_vs_baseline']:.2f}x "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    slowest = min(rows, key=lambda r: r["speedup_vs_baseline"])
    return {"layers": GRID_LAYERS, "factors": GRID, "centre": CENTRE, "repetitions": f"{reps} to {MAX_REPS}: what fits {GRID_BUDGET_S} s",
            "device": m["device"], "threads": m["threads"],
            "points": rows, "slowest": {k: slowest[k] for k in (*GRID, "speedup_vs_baseline")}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--grid-reps", type=int, default=3, help="repetitions at each grid point, at least")
    parser.add_argument("--points", default="reference,grid", help="reference, grid, or both (comma-separated)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=json.dumps({"config": CONFIG, "batch": BATCH, "seq": SEQ}),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        return memory_child(args.memory_of, json.loads(args.shape))
    points = set(args.points.split(","))
    if points - {"reference", "grid"}:
        parser.error(f"--points {args.points!r}: expected reference, grid or both")
    result = {"config": CONFIG, "batch": BATCH, "seq_len": SEQ, "torch": torch.__version__}
    if "reference" in points:
        result["cpu"] = measure("cpu", torch.float32, args.reps, shares=True)
    if "grid" in points:
        result["grid"] = grid(args.grid_reps)
    if torch.cuda.is_available():
        result["cuda"] = measure("cuda", torch.bfloat16, args.reps)
        result["cuda"]["fp8_vs_bf16_gemm"] = fp8_vs_bf16_gemms()
    out = ROOT / "benchmarks" / "results" / "model_train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
