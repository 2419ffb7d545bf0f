"""MoE RL on the embedded default's policy: routing replay against the train/rollout mismatch, and
short GRPO runs with and without R3 + FP8 rollouts from one SFT checkpoint.

1. Mismatch, on one batch of held-out prompts x G samples, with the pieces the GRPO trainer uses
   (stages/rollouts.py: recorded routes, the sampling logprobs read off `generate`, FP8 rollouts):
   - fp8_rollout: rollouts with block-FP8 weights (router and head fp32), the training forward in
     fp32, with no replay and with R3 (the rollout's experts replayed);
   - bf16_rollout: the same with a bf16 copy of the policy as the rollout engine (the usual pairing
     of a bf16 inference engine with fp32 master weights);
   - bf16_engines: the same bf16 weights on both sides, as when trainer and inference engine both
     compute in bf16 (AReaL's and R3's setting): the rollout decodes token by token from the KV cache
     with MLA's absorbed decode, the trainer runs one forward over the whole sequence, so only the
     kernels and their rounding differ;
   - num_iterations_2: rollouts in the policy's own precision, one GRPO update on the batch (TRL's
     default loss, group-normalised accuracy rewards, Adam at the recipe's learning rate), then the
     second pass's forward with no replay, R2 (the first pass's experts) and R3.
   For each: k3 KL(π_rollout ‖ π_train) per completion token (mean), mean |Δlogp|, the share of
   (token, MoE layer) whose expert set differs from the rollout's in the forward that is trained,
   and the same for the experts the trainer's router would choose itself.
2. GRPO from the same SFT checkpoint, `--grpo-steps` each: baseline (rollouts in fp32, no replay),
   FP8 rollouts without replay, FP8 rollouts with R3; held-out pass@1 (the run's eval section), each
   variant's difference from the baseline seed by seed (mean, standard error, 95 % t-interval), and the
   reward and mismatch curves' means over the first and last quarter of steps. `--merge` gathers a
   previous record's seeds from the same checkpoint, so seeds run in different sessions make one record.

Writes benchmarks/results/moe_rl.json.

    python benchmarks/moe_rl.py [--sft-steps N | --sft CHECKPOINT] [--model-config YAML] [--grpo-steps 100]
                                [--prompts 32] [--skip-grpo] [--variants A,B] [--grpo-seeds 0,1,2]
                                [--runs-dir DIR] [--merge benchmarks/results/moe_rl.json] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1pipeline import config as cfg  # noqa: E402
from r1pipeline import host, rundir  # noqa: E402
from r1pipeline.model import R1MoEForCausalLM, routing  # noqa: E402
from r1pipeline.model.layers import fp8_compute  # noqa: E402
from r1pipeline.report import mean_and_se  # noqa: E402
from stages.rollouts import SampledLogprobs  # noqa: E402

RECIPE = ROOT / "recipes" / "tiny.yaml"
VARIANTS = {"baseline": [], "fp8_rollout": ["grpo.rollout_precision=fp8"],
            "fp8_rollout_r3": ["grpo.rollout_precision=fp8", "grpo.routing_replay=r3"]}


def pipeline(runs: Path, run: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "r1pipeline", "--runs-dir", str(runs), "--run", run, *args], cwd=ROOT,
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ---- 1. mismatch on one batch -------------------------------------------------------------------


def held_out_batch(recipe: dict, tokenizer, prompts: int, group: int):
    from data.loading import build_datasets
    from r1pipeline.evaluate import heldout_rows

    data = recipe["data"]
    rows = heldout_rows(build_datasets(data)["heldout"], data["system_prompt"])[:prompts]
    rows = [row for row in rows for _ in range(group)]
    tokenizer.padding_side = "left"
    encoded = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True)
    return rows, encoded["input_ids"], encoded["attention_mask"]


def generate(model, prompt_ids, prompt_mask, max_new_tokens: int, fp8: bool, seed: int):
    """Sampled completions (T = 1) with their routes and sampling logprobs, as the trainer's rollout."""
    sampled = SampledLogprobs(temperature=1.0)
    torch.manual_seed(seed)
    precision = fp8_compute(model) if fp8 else torch.no_grad()
    # With a KV cache, as the trainer's rollout decodes (stages/grpo.py), whatever the checkpoint's saved
    # config says (a Trainer elsewhere saves use_cache=False).
    with torch.no_grad(), precision, routing.recording(model) as log:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=1.0,
                             top_k=0, max_new_tokens=max_new_tokens, logits_processor=[sampled], use_cache=True)
    completion = out[:, prompt_ids.shape[1]:]
    eos = model.config.eos_token_id
    ends = (completion == eos).int().cumsum(1)
    completion_mask = ((ends == 0) | ((ends == 1) & (completion == eos))).long()  # up to and including EOS
    lengths = completion_mask.sum(1).tolist()
    per_sample = routing.generated_routes(log, prompt_mask, lengths)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    return out, attention, completion_mask, sampled.finish(out), routing.aligned(per_sample, attention)


def train_logps(model, sequences, attention, completion_len: int, replay=None, grad: bool = False):
    """Per-token logprobs of the completion tokens (fp32, T = 1) and (routes used, routes free)."""
    with torch.set_grad_enabled(grad), routing.replaying(model, replay), routing.recording(model) as log:
        logits = model(input_ids=sequences, attention_mask=attention).logits[:, -completion_len - 1:-1]
    logps = logits.float().log_softmax(-1).gather(2, sequences[:, -completion_len:, None]).squeeze(2)
    return logps, log[0]


def measure(train, rollout, completion_mask, routes_rollout, routes, prompt_len: int) -> dict:
    d = (train.detach() - rollout)[completion_mask.bool()]
    tokens = torch.cat([torch.zeros(completion_mask.shape[0], prompt_len, dtype=torch.long), completion_mask], 1)
    used, free = routes
    trained = routing.mismatch(routes_rollout, used, tokens)
    return {"k3_kl": (torch.expm1(d) - d).mean().item(), "abs_dlogp_mean": d.abs().mean().item(),
            "router_mismatch": trained["router"], "token_mismatch": trained["token"],
            "router_mismatch_free": routing.mismatch(routes_rollout, free, tokens)["router"]}


def grpo_update(model, rows, sequences, attention, completion_mask, logps, rollout_logps, tokenizer, lr: float,
                group: int, replay=None) -> None:
    """One GRPO step on the batch: TRL's default loss (token-level, clipped ratio against the rollout's
    logprobs, eps 0.2), advantages from the accuracy reward normalised per group, Adam."""
    from rewards.registry import resolve

    completions = tokenizer.batch_decode(sequences[:, -completion_mask.shape[1]:], skip_special_tokens=True)
    accuracy = resolve([{"name": "accuracy"}])[0].fn
    rewards = torch.tensor([r if r is not None else 0.0 for r in
                            accuracy([row["prompt"] for row in rows], completions,
                                     solution=[row["solution"] for row in rows])])
    grouped = rewards.view(-1, group)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    ratio = torch.exp(logps - rollout_logps)
    loss = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
    loss = (loss * completion_mask).sum() / completion_mask.sum()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss.backward()
    optimizer.step()
    model.zero_grad()


def mismatch_figures(checkpoint: Path, recipe: dict, prompts: int, group: int, seed: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = R1MoEForCausalLM.from_pretrained(checkpoint).eval()
    rows, prompt_ids, prompt_mask = held_out_batch(recipe, tokenizer, prompts, group)
    max_new, P = int(recipe["grpo"]["max_completion_length"]), prompt_ids.shape[1]
    figures = {}

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for name in ("fp8_rollout", "bf16_rollout", "bf16_engines"):
        engine = model if name == "fp8_rollout" else bf16
        trainer = bf16 if name == "bf16_engines" else model
        sequences, attention, completion_mask, rollout, routes = generate(engine, prompt_ids, prompt_mask, max_new,
                                                                          name == "fp8_rollout", seed)
        C = completion_mask.shape[1]
        figures[name] = {}
        for replay in ("none", "r3"):
            logps, used = train_logps(trainer, sequences, attention, C, routes if replay == "r3" else None)
            figures[name][replay] = measure(logps, rollout.float(), completion_mask, routes, used, P)

    sequences, attention, completion_mask, rollout, routes = generate(model, prompt_ids, prompt_mask, max_new, False, seed)
    C = completion_mask.shape[1]
    first = {}
    for replay in ("none", "r2", "r3"):
        trial = R1MoEForCausalLM.from_pretrained(checkpoint).train()
        trial.config.use_cache = False
        logps, first_routes = train_logps(trial, sequences, attention, C, routes if replay == "r3" else None, grad=True)
        first.setdefault("before_update", measure(logps, rollout, completion_mask, routes, first_routes, P))
        replayed = {"none": None, "r2": first_routes[0], "r3": routes}[replay]
        grpo_update(trial, rows, sequences, attention, completion_mask, logps, rollout, tokenizer,
                    float(recipe["grpo"]["learning_rate"]), group, replayed)
        trial.eval()
        logps2, second_routes = train_logps(trial, sequences, attention, C, replayed)
        first[replay] = measure(logps2, rollout, completion_mask, routes, second_routes, P)
        if replay == "none":
            # The aux-loss-free bias update after the step (γ · sign of the load error, the load counted
            # in the training forward): the routers it alone flips, against those the gradient step flipped.
            trial.update_routing_bias()
            _, after_bias = train_logps(trial, sequences, attention, C)
            tokens = torch.cat([torch.zeros(len(rows), P, dtype=torch.long), completion_mask], 1)
            first["bias_update"] = {
                "bias_update_speed": trial.config.bias_update_speed,
                "router_flips_from_bias_update": routing.mismatch(second_routes[1], after_bias[1], tokens)["router"],
                "router_flips_from_gradient_step": routing.mismatch(first_routes[1], second_routes[1], tokens)["router"]}
    figures["num_iterations_2"] = first
    figures["batch"] = {"prompts": prompts, "group": group, "sequences": len(rows), "completion_tokens":
                        int(completion_mask.sum()), "route_bytes": routing.nbytes(routes)}
    return figures


# ---- 2. GRPO runs -------------------------------------------------------------------------------


def quarters(rows: list[dict], key: str) -> dict:
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
    if len(values) < 4:
        return {}
    q = len(values) // 4
    return {"first_quarter": sum(values[:q]) / q, "last_quarter": sum(values[-q:]) / q}


def grpo_run(runs: Path, sft: Path, steps: int, name: str, seed: int) -> dict:
    """One variant at one GRPO seed: its run (skipped by the pipeline if already done with the same config, the
    wall time then its manifest's), its held-out eval, and its curves' quarters."""
    run = f"{name}_seed{seed}"
    pipeline(runs, run, "grpo", f"grpo.init_from={sft}", f"grpo.max_steps={steps}", "grpo.save_steps=1000",
             f"grpo.seed={seed}", *VARIANTS[name])
    wall = rundir.read_manifest(runs / run / "grpo")["wall_time_s"]
    pipeline(runs, run, "eval")
    evaluated = json.loads((runs / run / "eval" / "grpo.json").read_text())
    rows = [json.loads(line) for line in (runs / run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    return {"grpo_wall_s": round(wall, 1), "pass@1": evaluated["pass@1"], "k": evaluated["k"],
            "reward": quarters(rows, "reward"),
            **{key.split("/")[-1]: quarters(rows, key) for key in
               ("sampling/kl_k3", "routing/router_mismatch", "routing/router_mismatch_free", "sampling/is_clip_frac")}}


# Two-sided 95 % quantiles of Student's t by degrees of freedom (1-30); beyond 30 the 30th, a little wide.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired(baseline: dict, variant: dict) -> dict:
    """The variant's held-out pass@1 minus the baseline's at the same GRPO seed (same SFT checkpoint), in
    points: each seed's difference, their mean, standard error and 95 % t-interval."""
    seeds = sorted(set(baseline) & set(variant), key=int)
    diffs = [100 * (variant[seed]["pass@1"] - baseline[seed]["pass@1"]) for seed in seeds]
    n = len(diffs)
    summary = {"seeds": seeds, "diff_points": [round(d, 4) for d in diffs], "n": n,
               "mean_points": sum(diffs) / n if n else None}
    if n >= 2:
        mean, se = mean_and_se(diffs)
        t = T975[min(n - 1, len(T975)) - 1]
        summary.update(se_points=se, ci95_points=[mean - t * se, mean + t * se])
    return summary


def grpo_runs(runs: Path, sft: Path, steps: int, variants: list[str], seeds: list[int], carried=None) -> dict:
    """Each variant at each GRPO seed (the SFT checkpoint shared), seed by seed so that a stopped invocation
    leaves whole pairs; then each variant's mean pass@1 and its difference from the baseline seed by seed.
    `carried` holds earlier seeds' results ({variant: {seed: result}}, e.g. a previous record's): the seeds
    run now replace theirs. With a kept `--runs-dir`, seeds already run are read back rather than rerun."""
    per_seed = {name: dict((carried or {}).get(name, {})) for name in variants}
    for seed in seeds:
        for name in variants:
            per_seed[name][str(seed)] = grpo_run(runs, sft, steps, name, seed)
    results = {}
    for name in variants:
        ordered = dict(sorted(per_seed[name].items(), key=lambda item: int(item[0])))
        scores = [result["pass@1"] for result in ordered.values()]
        results[name] = {"overrides": VARIANTS[name], "seeds": ordered, "pass@1_mean": sum(scores) / len(scores)}
        if name != "baseline" and "baseline" in variants:
            results[name]["vs_baseline"] = paired(per_seed["baseline"], ordered)
    return results


def carried_seeds(previous: dict, steps: int, trained: dict) -> dict:
    """A previous record's per-seed GRPO results, to gather with this invocation's: only from the same GRPO
    steps and an SFT checkpoint of the same steps and model config (the checkpoint itself the user vouches
    for, e.g. by a seed that reproduces)."""
    if "grpo" not in previous:
        raise ValueError("it has no GRPO runs (it was made with --skip-grpo)")
    theirs = {"grpo steps": previous["grpo"]["steps"], "sft steps": previous.get("sft_steps"),
              "model config": previous.get("model_config")}
    ours = {"grpo steps": steps, "sft steps": trained["sft_steps"], "model config": trained["model_config"]}
    differ = [f"{key} {theirs[key]!r} (this run: {ours[key]!r})" for key in ours if theirs[key] != ours[key]]
    if differ:
        raise ValueError("it differs in " + ", ".join(differ))
    return {name: run["seeds"] for name, run in previous["grpo"]["runs"].items()}


def trained_with(sft: Path) -> dict:
    """The SFT steps and model config the checkpoint was trained with (its stage's config.json)."""
    config = rundir.read_json(sft.parent / "stage_config.json")["config"]
    return {"sft_steps": config["sft"]["max_steps"], "model_config": (config.get("model") or {}).get("config")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-steps", type=int, help="default: the recipe's")
    parser.add_argument("--sft", help="an SFT checkpoint to start from instead (skips stage 0 and the SFT run), "
                                      "e.g. runs/default/sft/final of `make all`")
    parser.add_argument("--model-config", help="overrides of the preset for the SFT run, as in a recipe's "
                                               "model.config, e.g. '{num_hidden_layers: 4, n_routed_experts: 16}'")
    parser.add_argument("--grpo-steps", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts in the mismatch batch (x 8)")
    parser.add_argument("--seed", type=int, default=0, help="the mismatch batch's sampling seed")
    parser.add_argument("--grpo-seeds", default="0", help="GRPO seeds of part 2, comma-separated (e.g. 0,1,2)")
    parser.add_argument("--skip-grpo", action="store_true", help="part 1 only")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="GRPO runs of part 2, of " + ", ".join(VARIANTS))
    parser.add_argument("--runs-dir", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--merge", help="a previous record of this script (same --sft checkpoint and --grpo-steps) "
                                        "whose GRPO seeds are gathered with this invocation's, e.g. "
                                        "benchmarks/results/moe_rl.json")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "moe_rl.json"))
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    try:
        seeds = [int(seed) for seed in args.grpo_seeds.split(",")]
    except ValueError:
        parser.error(f"--grpo-seeds: {args.grpo_seeds!r} is not a comma-separated list of integers")
    previous, carried = {}, None
    if args.merge:
        if not args.sft or args.skip_grpo:
            parser.error("--merge gathers GRPO seeds from the same checkpoint: it needs --sft and no --skip-grpo")
        try:
            previous = json.loads(Path(args.merge).read_text())
            trained = trained_with(Path(args.sft))
        except (OSError, ValueError) as error:
            parser.error(f"--merge {args.merge} with --sft {args.sft}: {error}")
        try:
            carried = carried_seeds(previous, args.grpo_steps, trained)
        except (ValueError, KeyError) as error:
            parser.error(f"--merge {args.merge}: {error}")
    recipe = cfg.load_recipe(str(RECIPE))
    group = int(recipe["grpo"]["num_generations"])
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir or tmp)
        start = time.monotonic()
        sft = Path(args.sft) if args.sft else runs / "sft" / "sft" / "final"
        if not args.sft:
            steps = [f"sft.max_steps={args.sft_steps}"] if args.sft_steps else []
            shape = [f"model.config={args.model_config}"] if args.model_config else []
            # The recipe's cold start: stage 0's base, then SFT on it (from random weights, SFT alone does
            # not learn three-number sums: GRPO from such a checkpoint reached pass@1 0.026).
            pipeline(runs, "sft", "base", *shape)
            pipeline(runs, "sft", "sft", *steps, *shape, "sft.save_steps=100000")
        record = {"benchmark": "MoE RL: routing replay vs train/rollout mismatch (benchmarks/moe_rl.py)",
                  "host": host.describe(),
                  "recipe": str(RECIPE.relative_to(ROOT)),
                  "sft": str(args.sft or "the recipe's stages 0 and 1 (base, then SFT)"), **trained_with(sft),
                  "mismatch": mismatch_figures(sft, recipe, args.prompts, group, args.seed)}
        for name in ("fp8_rollout", "bf16_rollout", "bf16_engines", "num_iterations_2"):
            none, r3 = record["mismatch"][name]["none"]["k3_kl"], record["mismatch"][name]["r3"]["k3_kl"]
            record["mismatch"][name]["k3_kl_cut_by_r3"] = none / r3 if r3 else float("inf")
        if not args.skip_grpo:
            record["grpo"] = {"steps": args.grpo_steps,
                              "runs": grpo_runs(runs, sft, args.grpo_steps, args.variants.split(","), seeds, carried)}
            if args.merge:
                record["grpo"]["merged_from"] = {"file": args.merge, "seeds_run_now": seeds, "sft": previous.get("sft"),
                                                 "notes": previous.get("notes"),
                                                 "merged_from": previous["grpo"].get("merged_from")}
        record["wall_s"] = round(time.monotonic() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["mismatch"], indent=2))
    if "grpo" in record:
        print(json.dumps(record["grpo"], indent=2))


if __name__ == "__main__":
    main()
