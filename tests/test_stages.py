"""End to end on the real stages (TRL trainers, tiny DeepSeek-V3 policy, synthetic data), run as
`python -m r1pipeline` subprocesses the way `make` runs them. A killed stage resumes from its
newest complete checkpoint and ends with exactly the weights of an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (FAST_ALIGN, FAST_BASE, FAST_DATA, FAST_DISTILL, FAST_EVAL, FAST_GRPO, FAST_REJECTION, FAST_SFT,
                      ROOT, pipeline_env)

pytestmark = pytest.mark.slow

KILLER_REWARD = '''
import os, signal
from pathlib import Path

def brevity(prompts, completions, completion_ids=None, **columns):
    """A user reward; when KILL_AFTER names an existing file it SIGKILLs its own training process."""
    marker = os.environ.get("KILL_AFTER")
    if marker and Path(marker).exists():
        os.kill(os.getpid(), signal.SIGKILL)
    return [1.0 / (1 + len(ids)) for ids in completion_ids]
'''


def pipeline(runs_dir, run, stage, *overrides, env=None, kill_when=None, accelerate_config=None):
    """Run `python -m r1pipeline`; with kill_when, SIGKILL the whole process group once it holds."""
    command = [sys.executable, "-m", "r1pipeline", "--runs-dir", str(runs_dir), "--run", run]
    if accelerate_config:
        command += ["--accelerate-config", str(accelerate_config)]
    log = runs_dir.parent / f"{run}-{stage}-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([*command, stage, *overrides], cwd=ROOT, env=env or pipeline_env(),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            if kill_when is not None and kill_when():
                kill_tree(process)
                break
            time.sleep(0.01)
        if process.poll() is None:
            kill_tree(process)
            pytest.fail(f"timed out: {command}")
    return process.returncode, log.read_text()


def kill_tree(process) -> None:
    """SIGKILL the process and every descendant: torchrun starts accelerate's workers in sessions of
    their own, out of reach of the process group."""
    import psutil

    family = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(family, timeout=30)


def weights(stage_dir: Path) -> dict:
    return load_file(str(stage_dir / "final" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, f"weights differ after resume: {different[:5]}"


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """A short SFT run, shared as the GRPO tests' starting point."""
    runs = tmp_path_factory.mktemp("shared") / "runs"
    code, out = pipeline(runs, "base", "sft", *FAST_DATA, *FAST_SFT)
    assert code == 0, out
    return runs / "base" / "sft" / "final"


def test_sft_killed_then_resumed_equals_uninterrupted(tmp_path):
    runs = tmp_path / "runs"
    args = [*FAST_DATA, *FAST_SFT, "sft.max_steps=30", "sft.save_steps=3"]
    code, out = pipeline(runs, "straight", "sft", *args)
    assert code == 0, out

    stage = runs / "killed" / "sft"
    code, _ = pipeline(runs, "killed", "sft", *args, kill_when=lambda: (stage / "checkpoint-3" / "COMPLETE").exists())
    assert code == -signal.SIGKILL and not (stage / "manifest.json").exists(), "the run must really be killed"
    # A checkpoint killed mid-write, newer than every complete one, must never be loaded.
    newest = max(int(p.name.split("-")[1]) for p in stage.glob("checkpoint-*") if (p / "COMPLETE").exists())
    torn = stage / f"checkpoint-{newest + 1}"
    torn.mkdir(exist_ok=True)
    (torn / "COMPLETE").unlink(missing_ok=True)
    (torn / "model.safetensors").write_bytes(b"torn write")

    code, out = pipeline(runs, "killed", "sft", *args)
    assert code == 0, out
    assert f"sft: resuming from {stage / f'checkpoint-{newest}'} (step {newest})" in out
    assert f"removed incomplete checkpoint {torn}" in out
    assert_same_weights(runs / "straight" / "sft", stage)
    steps = [row["step"] for row in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())
             if "loss" in row]
    assert steps == list(range(1, 31)), "metrics.jsonl holds each step once after a resume"


def test_grpo_killed_then_resumed_equals_uninterrupted(tmp_path, sft_checkpoint):
    """Also: a user reward given by dotted path is used and logged under its name, and a checkpoint
    inside a generation batch (steps_per_generation=2, save_steps=3) resumes exactly."""
    plugins = tmp_path / "plugins"
    (plugins / "my_pkg").mkdir(parents=True)
    (plugins / "my_pkg" / "__init__.py").write_text("")
    (plugins / "my_pkg" / "my_rewards.py").write_text(KILLER_REWARD)
    runs = tmp_path / "runs"
    args = [*FAST_DATA, *FAST_GRPO, f"grpo.init_from={sft_checkpoint}", "grpo.save_steps=3",
            "grpo.steps_per_generation=2", "grpo.logging_steps=1",
            "grpo.rewards=[{name: exact_match, weight: 1.0}, {function: 'my_pkg.my_rewards:brevity', weight: 0.5}]"]
    code, out = pipeline(runs, "straight", "grpo", *args, env=pipeline_env(plugins))
    assert code == 0, out

    stage = runs / "killed" / "grpo"
    killer = {**pipeline_env(plugins), "KILL_AFTER": str(stage / "checkpoint-3" / "COMPLETE")}
    code, _ = pipeline(runs, "killed", "grpo", *args, env=killer)
    assert code == -signal.SIGKILL and not (stage / "manifest.json").exists()
    assert (stage / "checkpoint-3" / "COMPLETE").exists() and not (stage / "checkpoint-6").exists()

    code, out = pipeline(runs, "killed", "grpo", *args, env=pipeline_env(plugins))
    assert code == 0, out
    assert f"grpo: resuming from {stage / 'checkpoint-3'} (step 3)" in out
    assert_same_weights(runs / "straight" / "grpo", stage)

    # Rewards are logged when a batch is generated (every steps_per_generation=2 steps): the resumed
    # run logs each of them once, with the uninterrupted run's values.
    def reward_rows(stage_dir):
        logged = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        return [(row["step"], row["rewards/brevity/mean"], row["rewards/exact_match/mean"])
                for row in logged if "reward" in row]

    assert [step for step, *_ in reward_rows(stage)] == [1, 3, 5]
    assert reward_rows(stage) == reward_rows(runs / "straight" / "grpo")
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["input"]["path"] == str(sft_checkpoint)
    assert manifest["config"]["grpo"]["rewards"][1]["function"] == "my_pkg.my_rewards:brevity"


def test_all_chains_stages_and_skips_done_ones(tmp_path):
    runs = tmp_path / "runs"
    args = [*FAST_DATA, *FAST_SFT, *FAST_GRPO, *FAST_REJECTION, *FAST_ALIGN, *FAST_DISTILL, *FAST_EVAL, *FAST_BASE,
            "grpo.max_steps=2", "sft.max_steps=2", "rejection.max_steps=2", "align.max_steps=2"]
    code, out = pipeline(runs, "chain", "all", *args)
    assert code == 0, out
    run = runs / "chain"
    stages = ("base", "sft", "grpo", "rejection", "align", "distill")
    manifests = {name: json.loads((run / name / "manifest.json").read_text()) for name in stages}
    assert manifests["base"]["input"]["kind"] == "preset"
    # The chain: each stage names the output it started from, with that output's content hash; stages 1
    # and 3 start from stage 0's base (R1's shape, tiny.yaml).
    for stage, source in (("sft", "base"), ("grpo", "sft"), ("rejection", "base"), ("align", "rejection")):
        assert manifests[stage]["input"]["path"] == str(run / source / "final")
        assert manifests[stage]["input"]["hash"] == sft_output_hash(run / source / "final")
    for stage, teacher in (("rejection", "grpo"), ("distill", "align")):
        sampled = manifests[stage]["input"]["sampled_from"]
        assert sampled["path"] == str(run / teacher / "final")
        assert sampled["hash"] == sft_output_hash(run / teacher / "final")
    # Stage 5's student: a dense preset of its own, trained with the teacher's tokenizer.
    assert manifests["distill"]["input"]["kind"] == "preset" and manifests["distill"]["input"]["preset"] == "tiny-dense"
    distill_rows = (run / "distill" / "distill_data.jsonl").read_text().splitlines()
    assert len(distill_rows) > 0 and (run / "distill" / "final" / "tokenizer.json").read_text() == \
        (run / "align" / "final" / "tokenizer.json").read_text()
    grpo = manifests["grpo"]
    assert {"torch", "transformers", "trl"} <= grpo["versions"].keys() and grpo["wall_time_s"] > 0
    assert grpo["host"]["cores"] >= 1 and grpo["host"]["cpu"]  # which machine the wall time is of
    assert {path.stem for path in (run / "eval").glob("*.json")} == set(stages)
    # Every final checkpoint generates with its KV cache outside our stages too (the Trainer had turned
    # use_cache off for its training forwards).
    for name in stages:
        for file in ("config.json", "generation_config.json"):
            assert json.loads((run / name / "final" / file).read_text())["use_cache"] is True, (name, file)
    report = (run / "report.md").read_text()
    stages_table = report.split("## Stages")[1].split("##")[0]
    sizes = {line.split("|")[1].strip(): float(line.split("|")[2].strip().rstrip("M"))
             for line in stages_table.splitlines() if line.startswith(("| align |", "| distill |"))}
    assert 0 < sizes["distill"] < 0.5 * sizes["align"], report  # the dense student against the MoE teacher
    assert list((run / "plots").glob("*.png"))

    # `make demo`'s control: GRPO from this run's SFT with shuffled rewards, in a run beside it, which
    # the report (rewritten by the next `all`) finds by the checkpoint's content hash and shows.
    control = [*args, "grpo.shuffle_rewards=true", f"grpo.init_from={run / 'sft' / 'final'}"]
    for stage in ("grpo", "eval"):
        code, out = pipeline(runs, "chain-control", stage, *control)
        assert code == 0, out
    assert {path.stem for path in (runs / "chain-control" / "eval").glob("*.json")} == {"grpo"}

    code, out = pipeline(runs, "chain", "all", *args)
    assert code == 0, out
    assert all(f"{name}: done, skipping" in out for name in stages)
    report = (run / "report.md").read_text()
    assert "| grpo, control: rewards shuffled (`chain-control`) |" in report, report
    assert "Dashed: the control" in report

    # A changed stage-3 setting re-runs stage 3 and, its output being new, stage 4; old outputs are
    # kept aside.
    code, out = pipeline(runs, "chain", "all", *args, "rejection.learning_rate=1e-3")
    assert code == 0, out
    assert "sft: done, skipping" in out and "grpo: done, skipping" in out
    assert not any(f"{name}: done, skipping" in out for name in ("rejection", "align", "distill"))
    assert list(run.glob("rejection.old-*/manifest.json")) and list(run.glob("align.old-*/manifest.json"))


def test_rejection_killed_while_sampling_does_not_resample(tmp_path, sft_checkpoint):
    runs = tmp_path / "runs"
    samples = runs / "killed" / "rejection" / "samples.jsonl"
    args = [*FAST_DATA, *FAST_REJECTION, f"rejection.sample_from={sft_checkpoint}", "rejection.init_from=model",
            "rejection.sampling.batch_size=4", "rejection.sampling.num_samples=2", "rejection.sampling.num_prompts=16",
            # One process: two workers finish these tiny batches in bursts, past the kill's polling (CI saw all 16).
            "rejection.sampling.workers=1"]

    def sampled() -> list[str]:
        return samples.read_text().splitlines() if samples.exists() else []

    code, _ = pipeline(runs, "killed", "rejection", *args, kill_when=lambda: len(sampled()) >= 4)
    assert code == -signal.SIGKILL
    before = [line for line in sampled() if line.endswith("}")]
    assert 4 <= len(before) < 16, "killed midway"

    code, out = pipeline(runs, "killed", "rejection", *args)
    assert code == 0, out
    after = sampled()
    assert after[:len(before)] == before, "samples of finished prompts are kept as they were, not re-sampled"
    ids = [json.loads(line)["id"] for line in after]
    assert len(ids) == len(set(ids)) == 16
    selection = json.loads((samples.parent / "selection.json").read_text())
    assert selection["samples"] == 32 and selection["kept"] <= 32
    kept = [json.loads(line) for line in (samples.parent / "kept.jsonl").read_text().splitlines()]
    assert kept and all(row["source"]["checkpoint"] == str(sft_checkpoint) for row in kept)
    assert max(sum(row["id"] == i for row in kept) for i in ids) <= 2, "at most max_per_prompt per prompt"


def test_base_killed_then_resumed_equals_uninterrupted(tmp_path):
    """Stage 0 packs its corpus into blocks (TRL's wrapped packing); a resume must see the same blocks
    in the same order."""
    # Steps long enough (~0.2 s) that the kill lands before checkpoint-4.
    killed_after_checkpoint_2_resumes_exactly(tmp_path / "runs", "base", [
        *FAST_DATA, *FAST_BASE, "base.max_steps=8", "base.documents=200", "base.per_device_train_batch_size=32",
        "base.max_length=128"])


def test_rejection_sft_killed_then_resumed_equals_uninterrupted(tmp_path, sft_checkpoint):
    runs = tmp_path / "runs"
    # R1's way, the stage's default: retrain the base (a fresh preset here).
    args = [*FAST_DATA, *FAST_REJECTION, f"rejection.sample_from={sft_checkpoint}", "rejection.init_from=model",
            "rejection.max_steps=8"]
    stage = killed_after_checkpoint_2_resumes_exactly(runs, "rejection", args)
    assert (stage / "sft_data.jsonl").read_text() == (runs / "straight" / "rejection" / "sft_data.jsonl").read_text()


def test_align_killed_then_resumed_equals_uninterrupted(tmp_path, sft_checkpoint):
    """Stage 4 logs a mean for every reward, rule-based and reward-model ones, each over the rows it
    applies to, and resumes exactly like stage 2."""
    runs = tmp_path / "runs"
    args = [*FAST_DATA, *FAST_ALIGN, f"align.init_from={sft_checkpoint}", "align.max_steps=6",
            "align.general_ratio=0.5"]
    stage = killed_after_checkpoint_2_resumes_exactly(runs, "align", args)

    logged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    for name in ("accuracy", "format", "helpfulness", "harmlessness"):
        assert any(f"rewards/{name}/mean" in row for row in logged), name
    manifest = json.loads((stage / "manifest.json").read_text())
    assert "reward_model/accuracy" in manifest["metrics"] or any(k.startswith("reward_model/") for k in manifest["metrics"])


def test_distill_on_policy_killed_then_resumed_equals_uninterrupted(tmp_path, sft_checkpoint):
    """Stage 5 with on-policy distillation (TRL DistillationTrainer, the SFT'd student against the
    teacher's distributions): killed inside the on-policy phase, it skips the finished SFT phase,
    resumes from on_policy/checkpoint-2 and ends with the uninterrupted run's weights."""
    runs = tmp_path / "runs"
    args = [*FAST_DATA, *FAST_DISTILL, f"distill.sample_from={sft_checkpoint}", "distill.data_from=null",
            "distill.sampling.max_new_tokens=12",
            "distill.filters={over_long: false}",
            "distill.on_policy={max_steps: 4, save_steps: 2, per_device_train_batch_size: 4, "
            "max_completion_length: 12, logging_steps: 1, learning_rate: 1.0e-3, gradient_checkpointing: false}"]
    code, out = pipeline(runs, "straight", "distill", *args)
    assert code == 0, out
    straight = runs / "straight" / "distill"
    assert not torch.equal(weights(straight)["model.embed_tokens.weight"],
                           load_file(str(straight / "sft_final" / "model.safetensors"))["model.embed_tokens.weight"])
    logged = [json.loads(line) for line in (straight / "on_policy" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "loss" in row] == [1, 2, 3, 4]
    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["metrics"]["on_policy/train_loss"] > 0 and manifest["metrics"]["student_parameters"] > 0

    stage = runs / "killed" / "distill"
    checkpoint = stage / "on_policy" / "checkpoint-2"
    code, _ = pipeline(runs, "killed", "distill", *args, kill_when=lambda: (checkpoint / "COMPLETE").exists())
    assert code == -signal.SIGKILL and not (stage / "manifest.json").exists()
    code, out = pipeline(runs, "killed", "distill", *args)
    assert code == 0, out
    assert f"distill: resuming from {checkpoint} (step 2)" in out and "distill: student" not in out
    assert_same_weights(straight, stage)
    assert json.loads((stage / "manifest.json").read_text())["metrics"]["student_parameters"] == \
        manifest["metrics"]["student_parameters"]


def killed_after_checkpoint_2_resumes_exactly(runs, name: str, args: list[str]):
    """Run stage `name` straight (run "straight"), then again (run "killed") SIGKILLed once
    checkpoint-2 is complete, then re-run it: it must resume from checkpoint-2 and end with the
    straight run's weights. Returns the resumed stage directory."""
    code, out = pipeline(runs, "straight", name, *args)
    assert code == 0, out
    stage = runs / "killed" / name
    code, _ = pipeline(runs, "killed", name, *args, kill_when=lambda: (stage / "checkpoint-2" / "COMPLETE").exists())
    assert code == -signal.SIGKILL and not (stage / "manifest.json").exists()
    code, out = pipeline(runs, "killed", name, *args)
    assert code == 0, out
    assert f"{name}: resuming from {stage / 'checkpoint-2'} (step 2)" in out
    assert_same_weights(runs / "straight" / name, stage)
    return stage


def sft_output_hash(path):
    from r1pipeline.rundir import content_hash

    return content_hash(path)


def test_fp8_resume_restores_the_fp32_masters(tmp_path):
    """With FP8 on, checkpoints hold e4m3 weights (the DeepSeek-V3 format); a resume must still
    continue from the fp32 master weights, or the resumed run drifts from the uninterrupted one."""
    runs = tmp_path / "runs"
    args = [*FAST_DATA, *FAST_SFT, "model.config.fp8=true"]
    code, out = pipeline(runs, "straight", "sft", *args)
    assert code == 0, out
    straight = runs / "straight" / "sft"
    assert (straight / "checkpoint-2" / "master_weights.safetensors").is_file()

    resumed = runs / "resumed" / "sft"
    resumed.mkdir(parents=True)
    for name in ("stage_config.json", "metrics.jsonl"):
        (resumed / name).write_bytes((straight / name).read_bytes())
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    code, out = pipeline(runs, "resumed", "sft", *args)
    assert code == 0, out
    assert "resuming from" in out and "checkpoint-2 (step 2)" in out
    assert_same_weights(straight, resumed)


def test_grpo_with_routing_replay_and_fp8_rollouts_resumes_exactly(tmp_path, sft_checkpoint):
    """R3 with FP8 rollouts: the rollout's experts are replayed (no trained router differs from the
    rollout's), every mismatch metric is logged, and a checkpoint inside a generation batch carries
    the batch's routes, so the resumed run replays what the uninterrupted one did."""
    runs = tmp_path / "runs"
    args = [*FAST_DATA, *FAST_GRPO, f"grpo.init_from={sft_checkpoint}", "grpo.save_steps=3",
            "grpo.steps_per_generation=2", "grpo.logging_steps=1", "grpo.routing_replay=r3",
            "grpo.rollout_precision=fp8"]
    code, out = pipeline(runs, "straight", "grpo", *args)
    assert code == 0, out
    rows = [json.loads(line) for line in (runs / "straight" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    scored = [row for row in rows if "sampling/kl_k3" in row]
    assert [row["step"] for row in scored] == [1, 3, 5]
    for row in scored:
        assert row["routing/router_mismatch"] == 0 and row["routing/token_mismatch"] == 0
        assert row["sampling/kl_k3"] > 0, "FP8 rollouts sample from other probabilities than the fp32 trainer"
        assert {"sampling/abs_dlogp_mean", "sampling/frac_dlogp_gt_ln2", "sampling/is_clip_frac",
                "routing/router_mismatch_free", "routing/bytes"} <= row.keys()
    # TRL's correction is on, token-level and truncated at C = 2 (the FP8 rollout defaults).
    assert all(row["sampling/importance_sampling_ratio/max"] <= 2.0 for row in scored)

    stage = runs / "killed" / "grpo"
    code, _ = pipeline(runs, "killed", "grpo", *args,
                       kill_when=lambda: (stage / "checkpoint-3" / "COMPLETE").exists())
    assert code == -signal.SIGKILL
    buffered = torch.load(stage / "checkpoint-3" / "grpo_state_rank0.pt", weights_only=False)["buffered_inputs"]
    assert buffered and all(batch["routed_experts"].dtype == torch.int16 for batch in buffered)
    code, out = pipeline(runs, "killed", "grpo", *args)
    assert code == 0, out
    assert_same_weights(runs / "straight" / "grpo", stage)


def test_routing_replay_with_vllm_rollouts_is_refused_before_any_work(tmp_path, sft_checkpoint):
    runs = tmp_path / "runs"
    code, out = pipeline(runs, "vllm", "grpo", *FAST_DATA, *FAST_GRPO, "model.preset=tiny-vllm",
                         f"grpo.init_from={sft_checkpoint}",
                         "grpo.use_vllm=true", "grpo.routing_replay=r3")
    assert code != 0 and "grpo: routing_replay = 'r3'" in out and "use_vllm=false" in out
    assert not (runs / "vllm" / "grpo").exists(), "refused before any work"
