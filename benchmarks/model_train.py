"""Training speed of our DeepSeek-V3 policy vs transformers' DeepseekV3ForCausalLM.

Same config, same weights (ours saved, theirs loaded from that checkpoint), forward + backward of a
causal-LM loss, at a config where the MoE dominates. The models alternate within one run and each
figure is the median of the repetitions, so machine load (other test runs) hits all alike.
transformers runs with each of its CPU-capable experts implementations; the faster is the baseline.
Peak memory: what one training step adds to the model's own memory — the increase of peak RSS in a
fresh process per model (CPU), or torch.cuda.max_memory_allocated (GPU). On a GPU it also times block-FP8 vs bf16 GEMMs at
DeepSeek-V3 shapes. Writes benchmarks/results/model_train.json.

    python benchmarks/model_train.py [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
# DeepSeek-V3 GEMM shapes (tokens M, out N, in K): q_b, kv_a (bf16 there), o_proj, expert up, expert down.
V3_GEMMS = [(4096, 24576, 1536), (4096, 7168, 16384), (4096, 4096, 7168), (4096, 2048, 7168), (4096, 7168, 2048)]


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


def time_interleaved(models, batch, reps, device):
    for model in models.values():  # warm-up
        step(model, batch)
    times = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            sync(device)
            start = time.perf_counter()
            step(model, batch)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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


def measure(device, dtype, reps, config=CONFIG, batch=BATCH, seq=SEQ, memory=True):
    """Step time of ours against transformers' fastest implementation, and (with `memory`) each one's
    peak memory."""
    with tempfile.TemporaryDirectory() as d:
        models = build(device, dtype, d, config)
    shape = (batch, seq)
    batch = torch.randint(0, config["vocab_size"], shape, device=device)
    load_before = os.getloadavg()[0]
    # transformers' implementations are first raced against each other (interleaved, 2 repetitions);
    # the fastest then alternates with ours for the full count.
    probe = time_interleaved({n: m for n, m in models.items() if n != "ours"}, batch, 2, device)
    fastest = min(probe, key=probe.get)
    seconds = time_interleaved({"ours": models["ours"], fastest: models[fastest]}, batch, reps, device)
    load_after = os.getloadavg()[0]
    tokens = shape[0] * shape[1]
    figures = {name: {"tokens_per_s": tokens / s, "step_ms": s * 1e3} for name, s in seconds.items()}
    for name in figures if memory else ():
        figures[name]["peak_memory_mb"] = peak_memory_mb(name, device, dtype, config, *shape)
    baseline = fastest
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "load_average_1min": [load_before, load_after],
        "repetitions": reps,
        "transformers_race_step_ms": {name: s * 1e3 for name, s in probe.items()},
        "models": figures,
        "baseline": baseline,
        "speedup_vs_baseline": figures["ours"]["tokens_per_s"] / figures[baseline]["tokens_per_s"],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=json.dumps({"config": CONFIG, "batch": BATCH, "seq": SEQ}),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        return memory_child(args.memory_of, json.loads(args.shape))
    result = {"config": CONFIG, "batch": BATCH, "seq_len": SEQ, "torch": torch.__version__,
              "cpu": measure("cpu", torch.float32, args.reps)}
    if torch.cuda.is_available():
        result["cuda"] = measure("cuda", torch.bfloat16, args.reps)
        result["cuda"]["fp8_vs_bf16_gemm"] = fp8_vs_bf16_gemms()
    out = ROOT / "benchmarks" / "results" / "model_train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
