"""`python -m r1pipeline [--recipe R] [--run NAME] STAGE [section.field=value ...]`

STAGE is one of the stages (base, sft, grpo, rejection, align, distill), `eval` (every finished stage on the
held-out problems), `report` (runs/<run>/report.md and plots), or `all` (the recipe's stages, in R1's
order, then eval and report). `python -m r1pipeline export --run R --stage S --gguf` writes a stage's
checkpoint as GGUF (r1pipeline/export.py). `--dry-run` validates and prints the plan without running it. With
ACCELERATE_CONFIG=<file> (or --accelerate-config) the stages run under `accelerate launch` with that
config; the recipe is validated once here first, so a bad recipe fails before any process starts.
Evaluation and the report run in this process. Hub names are read from R1PIPELINE_HUB_MIRROR, a
local mirror directory, when it holds them (r1pipeline/hub.py).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from r1pipeline.config import ConfigError, apply_overrides, load_recipe
from r1pipeline.pipeline import (POST_TRAINING, STAGE_ORDER, accelerate_setup, execute, keep_vllm_out_of_trl, log, plan,
                                 plan_eval, start_process_group, uses_trl_vllm, world_size_of)

LAUNCHED = "R1PIPELINE_UNDER_ACCELERATE"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="r1pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=[*STAGE_ORDER, "eval", "report", "all"])
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. grpo.learning_rate=1e-5")
    parser.add_argument("--recipe", default="tiny", help="name in recipes/ or path to a YAML file")
    parser.add_argument("--run", default="default", help="run name: outputs go to <runs-dir>/<run>/")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--accelerate-config", default=os.environ.get("ACCELERATE_CONFIG") or None)
    parser.add_argument("--dry-run", action="store_true",
                        help="validate everything the run would (config, data, rewards, batches) and print the "
                             "plan with parameter and memory estimates; train, download and write nothing")
    return parser.parse_intermixed_args(argv)


def check_sharding(recipe: dict, accelerate_config: str | None, dry_run: bool) -> None:
    """A sharded accelerate config (FSDP, ZeRO-3) that cannot do what it says:
    - with LoRA: final/ is the merged model, merged on one process, where a sharded model is not whole;
    - without GPUs (not refused in a dry run, which plans for the recipe's machine): the stages run as
      one gloo group (ACCELERATE_USE_CPU, below). FSDP2 runs there (r1pipeline/sharding.py puts back
      the plugin accelerate leaves out on CPU); FSDP1 and DeepSpeed would become plain data parallel
      (MULTI_CPU, measured with accelerate 1.x), sharding nothing, silently."""
    sharded = accelerate_setup(accelerate_config)["sharded"]
    if (recipe.get("model") or {}).get("lora") and sharded:
        raise ConfigError(f"model.lora with {accelerate_config} ({sharded}): merging the adapter into a sharded model "
                          "for final/ is not supported yet; train LoRA with recipes/accelerate/ddp.yaml (the base is "
                          "frozen, so its weights need no sharding of optimizer state), or train every weight")
    if sharded not in (None, "FSDP2") and not dry_run and not torch.cuda.is_available():
        raise ConfigError(f"ACCELERATE_CONFIG = {accelerate_config} ({sharded}) on a machine without GPUs: accelerate "
                          "would run it as plain data parallel on the CPU, sharding nothing; use "
                          "recipes/accelerate/fsdp2-cpu2.yaml for sharded training on the CPU (FSDP2 over gloo), "
                          "recipes/accelerate/cpu2.yaml for data parallel, or run it where GPUs are")


# Per-node settings of a multi-node launch (the config file holds what every node shares):
# environment variable -> `accelerate launch` option.
NODE_SETTINGS = {"MACHINE_RANK": "--machine_rank", "MAIN_PROCESS_IP": "--main_process_ip",
                 "MAIN_PROCESS_PORT": "--main_process_port"}


def launch_command(accelerate_config: str, argv: list[str], environ) -> list[str]:
    """`accelerate launch` of this same command line, with the node's own rank and rendezvous address
    when the environment gives them (one config file for every node)."""
    node = [item for name, option in NODE_SETTINGS.items() if environ.get(name) for item in (option, environ[name])]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config, *node,
            "-m", "r1pipeline", *argv]


def main(argv=None) -> int:
    """With no `argv`, the process's own command line: then the process is the run's alone, and a run
    that does not use TRL's vLLM integration keeps vLLM out of TRL's imports (`keep_vllm_out_of_trl`)."""
    own_process = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:  # `python -m r1pipeline export --run R --stage S --gguf`: r1pipeline/export.py
        from r1pipeline.export import main as export

        return export(argv[1:])
    args = parse_args(argv)
    stages = [s for s in [args.stage] if s in STAGE_ORDER]
    evaluates = args.stage in ("eval", "all")
    reports = args.stage in ("report", "all")
    run_dir = Path(args.runs_dir) / args.run
    try:
        if not re.fullmatch(r"[\w.-]+", args.run):
            raise ConfigError(f"run name {args.run!r} may hold only letters, digits, '_', '.' and '-'")
        if args.accelerate_config and not Path(args.accelerate_config).is_file():
            raise ConfigError(f"ACCELERATE_CONFIG = {args.accelerate_config!r}: no such file")
        recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
        if args.stage == "all":  # the stages the recipe has (R1-Zero: grpo alone), in R1's order
            stages = [s for s in STAGE_ORDER if s in recipe] or list(POST_TRAINING)
        if own_process and not uses_trl_vllm(recipe, stages):
            keep_vllm_out_of_trl()
        if os.environ.get(LAUNCHED):
            start_process_group(recipe, stages)
        planned = plan(recipe, stages, run_dir, world_size_of(args.accelerate_config), dry_run=args.dry_run)
        check_sharding(recipe, args.accelerate_config, args.dry_run)
        heldout = plan_eval(recipe, planned) if evaluates else None
        if args.dry_run:
            from r1pipeline.dryrun import describe

            print(describe(recipe, planned, heldout, args.accelerate_config))
            return 0
    except ConfigError as exc:
        print(f"r1pipeline: error: {exc}", file=sys.stderr)
        return 2

    if os.environ.get(LAUNCHED):  # one of accelerate's processes: the stages only
        for stage in planned:
            execute(stage)
        return 0
    if planned and args.accelerate_config:
        command = launch_command(args.accelerate_config, argv, os.environ)
        env = {**os.environ, LAUNCHED: "1"}
        if not torch.cuda.is_available():
            # accelerate's multi-process launcher assumes GPUs; without any, each process would train
            # alone. This makes them one gloo process group on the CPU (accelerate's MULTI_CPU).
            env["ACCELERATE_USE_CPU"] = "true"
        log(f"launching under accelerate: {' '.join(command[1:])}")
        code = subprocess.call(command, env=env)
        if code:
            return code
    else:
        for stage in planned:
            execute(stage)
    if evaluates:
        from r1pipeline.evaluate import run_eval

        run_eval(run_dir, recipe, heldout)
    if reports:
        from r1pipeline.report import write_report

        log(f"report: {write_report(run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
