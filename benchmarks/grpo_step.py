"""A whole GRPO step, ours against TRL's GRPOTrainer on stock transformers: rollout generation,
rewards and training, from one SFT checkpoint of the embedded default, with the same prompts, group
size, completion lengths, reward functions, GRPOConfig fields and seeds.

- ours: stage 2 as `make grpo` runs it (stages/grpo.py: our trainer subclass over our DeepSeek-V3
  policy, R1MoEForCausalLM, with its mismatch metrics);
- trl: `trl.GRPOTrainer` over transformers' `DeepseekV3ForCausalLM` loaded from the same checkpoint;
- ours_vllm (with `--sides ours,ours_vllm,trl`): our stage 2 with `grpo.use_vllm=true`, its rollouts from
  vLLM's engine (the CPU build here, colocated in the process, the weights synced into it before every
  step's rollouts and verified). vLLM's CPU build serves only the 512-wide MLA latent, so all sides then
  start from a `tiny-vllm` checkpoint (the recipe's cold start with `model.preset=tiny-vllm` when no
  `--sft` is given). TRL's side keeps transformers' `generate`: on CPU its own vLLM sync cannot load a
  stock model (README, "vLLM: CPU and GPU").

Two completion lengths: the embedded default's (`max_completion_length` 96; completions end at EOS,
~50 tokens on a trained policy) and 4x that with every completion forced to the full length
(`generation_kwargs.min_new_tokens`, vLLM's `min_tokens`, given to every side), since a trained policy
stops by itself long before. Each side runs in its own process, one warm-up step then timed steps, the sides alternating
(ours, trl, trl, ours, ...); the figure is the median step time over all timed steps, with its split:
generation (TRL's own profiling of `generate`), rewards (its profiling of each reward function), and
the rest (logprob forwards, loss, backward, optimizer step, our mismatch metrics, and with vLLM the
weight sync, also reported alone as `sync_s`).

Writes benchmarks/results/grpo_step.json (with ours_vllm: grpo_step_vllm.json).

    python benchmarks/grpo_step.py [--sft CHECKPOINT | --sft-steps N] [--prompts 16] [--lengths 96,384] [--steps 4]
                                   [--sides ours,ours_vllm,trl]
"""

from __future__ import annotations

import argparse
import importlib.util
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

RECIPE = ROOT / "recipes" / "tiny.yaml"
SIDES = ("ours", "ours_vllm", "trl")
BASELINE = "trl"
VLLM_MODEL = ["model.preset=tiny-vllm"]  # the one MLA shape vLLM's CPU build serves


# ---- one side, in its own process ---------------------------------------------------------------


def grpo_stage(sft: str, length: int, forced: bool, prompts: int, group: int, steps: int, run_dir: Path,
               vllm: bool = False):
    """Stage 2 of the embedded default, planned as `make grpo` plans it, with these sizes (`vllm`: as
    `make grpo ARGS="model.preset=tiny-vllm grpo.use_vllm=true"` plans it)."""
    from r1pipeline import config as cfg
    from r1pipeline.pipeline import plan

    overrides = [f"grpo.init_from={sft}", f"grpo.max_completion_length={length}", f"grpo.max_steps={steps}",
                 f"grpo.per_device_train_batch_size={prompts * group}", f"grpo.num_generations={group}",
                 "grpo.logging_steps=1", "grpo.save_steps=100000"]
    if vllm:
        overrides += [*VLLM_MODEL, "grpo.use_vllm=true"]
    if forced:
        overrides.append(f"grpo.generation_kwargs={{{'min_tokens' if vllm else 'min_new_tokens'}: {length}}}")
    recipe = cfg.apply_overrides(cfg.load_recipe(str(RECIPE)), overrides)
    [stage] = plan(recipe, ["grpo"], run_dir)
    return stage


def step_timer(reward_names: set[str]):
    """A callback timing each optimizer step, split by TRL's profiling contexts (which it otherwise
    reports to wandb/mlflow/trackio only); `reward_names` are the reward functions' names."""
    from transformers import TrainerCallback
    from trl.extras import profiling

    spans: list[tuple[str, float]] = []
    log_metrics = profiling.ProfilingContext._log_metrics

    def record(self, duration):
        spans.append((self.name, duration))
        log_metrics(self, duration)

    profiling.ProfilingContext._log_metrics = record

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            spans.clear()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - self.start
            generation = sum(d for name, d in spans if "generate" in name)
            rewards = sum(d for name, d in spans if name.split(".")[-1] in reward_names)
            sync = sum(d for name, d in spans if name.endswith("sync_weights"))
            self.steps.append({"step_s": total, "generation_s": generation, "reward_s": rewards,
                               "rest_s": total - generation - rewards, "sync_s": sync})

    return StepTimer()


def worker(side: str, sft: str, length: int, forced: bool, prompts: int, group: int, steps: int, out: Path) -> None:
    import torch

    from r1pipeline.pipeline import keep_vllm_out_of_trl

    if side != "ours_vllm":
        keep_vllm_out_of_trl()  # this side does not generate with vLLM; TRL would import it anyway (7 s)
    from stages import grpo

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        stage = grpo_stage(sft, length, forced, prompts, group, steps, Path(tmp), vllm=side == "ours_vllm")
        timer = step_timer({reward.fn.__name__ for reward in stage.rewards})
        lengths = []
        if side != BASELINE:
            ours = grpo.callbacks
            grpo.callbacks = lambda stage: [*ours(stage), timer]
            grpo.run(stage)
            lengths = [row["completions/mean_length"] for row in grpo.read_metrics(stage.stage_dir)
                       if "completions/mean_length" in row]
        else:
            from transformers import AutoTokenizer, DeepseekV3ForCausalLM
            from trl import GRPOTrainer

            model = DeepseekV3ForCausalLM.from_pretrained(sft, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(sft)
            tokenizer.padding_side = "left"
            trainer = GRPOTrainer(model=model, reward_funcs=[reward.fn for reward in stage.rewards],
                                  args=grpo.grpo_config(stage, model), train_dataset=grpo.build_dataset(stage),
                                  processing_class=tokenizer, callbacks=[timer])
            trainer.train()
            lengths = [row["completions/mean_length"] for row in trainer.state.log_history
                       if "completions/mean_length" in row]
    out.write_text(json.dumps({"side": side, "model": "DeepseekV3ForCausalLM" if side == BASELINE else
                               "R1MoEForCausalLM", "steps": timer.steps, "mean_completion_length": lengths}))


# ---- the comparison -----------------------------------------------------------------------------


def run_side(side, sft, length, forced, prompts, group, steps, directory: Path) -> dict:
    out = directory / f"{side}-{length}-{time.monotonic_ns()}.json"
    command = [sys.executable, __file__, "--worker", side, "--sft", str(sft), "--length", str(length),
               "--prompts", str(prompts), "--group", str(group), "--steps", str(steps), "--out", str(out)]
    subprocess.run(command + (["--forced"] if forced else []), cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.read_text())


def summary(runs: list[dict]) -> dict:
    timed = [step for run in runs for step in run["steps"][1:]]  # each process's first step warms up
    median = {key: statistics.median(step[key] for step in timed) for key in timed[0]}
    lengths = [value for run in runs for value in run["mean_completion_length"]]
    return {**{key: round(value, 3) for key, value in median.items()}, "timed_steps": len(timed),
            "mean_completion_length": round(statistics.mean(lengths), 1) if lengths else None,
            "model": runs[0]["model"]}


def measure(sft, lengths, prompts, group, steps, repeats, directory, sides=("ours", "trl")) -> dict:
    """Per length, each side's summary and each of ours' speed-up over TRL's (`speedup`, `generation_speedup`
    for `ours`; `speedup_vllm`, `generation_speedup_vllm` for `ours_vllm`). `steps`: per process, one
    count per length."""
    results = {}
    for index, (length, steps) in enumerate(zip(lengths, steps, strict=True)):
        forced = index > 0  # the recipe's own length ends at EOS; the longer ones are forced
        runs = {side: [] for side in sides}
        for repeat in range(repeats):
            for side in sides if repeat % 2 == 0 else sides[::-1]:
                runs[side].append(run_side(side, sft, length, forced, prompts, group, steps, directory))
                print(f"[grpo_step] length {length}: {side} run {repeat + 1} done", flush=True)
        figures = {side: summary(runs[side]) for side in sides}
        for side in sides:
            if side != BASELINE:
                suffix = side.removeprefix("ours")
                figures[f"speedup{suffix}"] = round(figures[BASELINE]["step_s"] / figures[side]["step_s"], 2)
                figures[f"generation_speedup{suffix}"] = round(
                    figures[BASELINE]["generation_s"] / figures[side]["generation_s"], 2)
        figures["max_completion_length"], figures["forced_to_full_length"] = length, forced
        figures["steps_per_process"] = steps
        results[str(length)] = figures
    return results


def check_vllm_checkpoint(parser, sft: str | None) -> None:
    """Before any work: vLLM installed, and a given checkpoint one the engine here serves (the CPU build:
    MLA latent + RoPE = 576, the tiny-vllm preset)."""
    if importlib.util.find_spec("vllm") is None:
        parser.error("--sides with ours_vllm: vLLM is not installed (`make install` installs its CPU build)")
    if sft is None:
        return
    from transformers import AutoConfig

    from r1pipeline import vllm_engine

    try:
        vllm_engine.check_servable(AutoConfig.from_pretrained(sft))
    except (OSError, ValueError) as exc:
        parser.error(f"--sides with ours_vllm, --sft {sft}: {exc} (or leave --sft out: a tiny-vllm cold start is "
                     "trained)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", help="the SFT checkpoint both sides start from (default: the recipe's stages 0 "
                                      "and 1, base then SFT, as `make all` trains them)")
    parser.add_argument("--sft-steps", type=int, help="SFT steps when --sft is not given (default: the recipe's)")
    parser.add_argument("--lengths", default="96,384", help="max completion lengths; all but the first forced")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (x group completions)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", default="4", help="steps per process, the first one a warm-up; one number, or "
                                                    "one per length (e.g. 4,2: TRL's steps at 4x length take minutes)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per side and length, alternating")
    parser.add_argument("--sides", default="ours,trl", help=f"which of {','.join(SIDES)} to run; trl, the baseline, "
                                                             "always (ours_vllm: all from a tiny-vllm checkpoint)")
    parser.add_argument("--out", help="default: benchmarks/results/grpo_step.json (with ours_vllm: "
                                      "grpo_step_vllm.json)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--forced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.sft, args.length, args.forced, args.prompts, args.group, int(args.steps),
                      Path(args.out))
    lengths = [int(n) for n in args.lengths.split(",")]
    try:
        steps = [int(n) for n in args.steps.split(",")]
    except ValueError:
        parser.error(f"--steps {args.steps!r}: not a number or a comma-separated list of numbers")
    if len(steps) not in (1, len(lengths)):
        parser.error(f"--steps {args.steps!r}: one number, or one per length ({len(lengths)})")
    steps = steps * len(lengths) if len(steps) == 1 else steps
    if any(n < 2 for n in steps) or args.repeats < 1 or any(n < 1 for n in lengths):
        parser.error("--steps must be >= 2 (one warm-up), --repeats >= 1, --lengths positive")
    sides = [side.strip() for side in args.sides.split(",") if side.strip()]
    if unknown := sorted(set(sides) - set(SIDES)):
        parser.error(f"--sides: {', '.join(unknown)} not among {', '.join(SIDES)}")
    sides = [side for side in SIDES if side in sides or side == BASELINE]
    vllm = "ours_vllm" in sides
    if vllm:
        check_vllm_checkpoint(parser, args.sft)
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("grpo_step_vllm.json" if vllm else "grpo_step.json"))

    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        sft = Path(args.sft) if args.sft else Path(tmp) / "runs" / "sft" / "sft" / "final"
        cold_start = "the recipe's stages 0 and 1" + (f", {args.sft_steps} SFT steps" if args.sft_steps else "")
        if not args.sft:  # the recipe's cold start: stage 0's base, then SFT on it, as `make all` runs them
            steps = [f"sft.max_steps={args.sft_steps}"] if args.sft_steps else []
            model = VLLM_MODEL if vllm else []
            cold_start += ", model.preset=tiny-vllm" if vllm else ""
            for stage in (["base", *model], ["sft", *model, *steps, "sft.save_steps=100000"]):
                subprocess.run([sys.executable, "-m", "r1pipeline", "--runs-dir", str(Path(tmp) / "runs"), "--run",
                                "sft", *stage], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        record = {"benchmark": "a whole GRPO step, ours vs TRL GRPOTrainer + transformers DeepseekV3ForCausalLM "
                               "(benchmarks/grpo_step.py)",
                  "host": host.describe(),
                  "recipe": str(RECIPE.relative_to(ROOT)), "sft": str(args.sft or cold_start),
                  "prompts": args.prompts, "group": args.group, "steps_per_process": steps,
                  "repeats": args.repeats, "sides": sides,
                  "lengths": measure(sft, lengths, args.prompts, args.group, steps, args.repeats, Path(tmp),
                                     sides)}
    record["wall_s"] = round(time.monotonic() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["lengths"], indent=2))


if __name__ == "__main__":
    main()
