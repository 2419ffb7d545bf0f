"""benchmarks/grpo_step.py: its arguments are checked before any work, its vLLM side runs a real GRPO
step of our stage with vLLM's CPU engine colocated, and the speed-ups it reports are each side's against
TRL's. The figures themselves are the benchmark's."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, pipeline_env

BENCHMARK = str(ROOT / "benchmarks" / "grpo_step.py")


@pytest.mark.parametrize("args, said", [
    (["--sides", "ours,vllm"], "--sides: vllm not among ours, ours_vllm, trl"),
    (["--steps", "4,2,1"], "--steps '4,2,1': one number, or one per length (2)"),
    (["--steps", "4,1"], "--steps must be >= 2 (one warm-up)"),
])
def test_bad_arguments_are_refused_before_any_work(args, said, tmp_path):
    done = subprocess.run([sys.executable, BENCHMARK, *args, "--out", str(tmp_path / "r.json")],
                          env=pipeline_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not any(tmp_path.iterdir())


def test_the_vllm_side_refuses_a_checkpoint_the_engine_cannot_serve_before_any_work(tmp_path):
    pytest.importorskip("vllm")
    from data import build_tokenizer
    from r1pipeline import policy

    tiny = tmp_path / "tiny"
    policy.build_from_preset("tiny", {}, build_tokenizer(["1 + 2 = 3"]), seed=0).save_pretrained(tiny)
    done = subprocess.run([sys.executable, BENCHMARK, "--sides", "ours_vllm", "--sft", str(tiny),
                           "--out", str(tmp_path / "r.json")],
                          env=pipeline_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--sides with ours_vllm" in done.stderr and "64 + 64 = 128" in done.stderr and "tiny-vllm" in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_speedups_are_each_of_our_sides_against_trl(monkeypatch, tmp_path):
    """The arithmetic of `measure`, on canned step times (no process started)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import grpo_step

    times = {"ours": (1.0, 0.5), "ours_vllm": (2.0, 1.0), "trl": (4.0, 3.0)}
    order = []

    def run_side(side, sft, length, forced, prompts, group, steps, directory):
        order.append((side, length, forced, steps))
        step, generation = times[side]
        steps = [{"step_s": 99.0, "generation_s": 99.0, "reward_s": 0.0, "rest_s": 0.0, "sync_s": 0.0}] + [
            {"step_s": step, "generation_s": generation, "reward_s": 0.1, "rest_s": step - generation - 0.1,
             "sync_s": 0.0}] * 3  # the first step of each process is a warm-up, left out
        return {"side": side, "model": "m", "steps": steps, "mean_completion_length": [float(length)]}

    monkeypatch.setattr(grpo_step, "run_side", run_side)
    figures = grpo_step.measure("ckpt", [8, 32], 2, 2, [4, 2], 2, tmp_path, ("ours", "ours_vllm", "trl"))
    assert figures["8"]["speedup"] == 4.0 and figures["8"]["generation_speedup"] == 6.0
    assert figures["8"]["speedup_vllm"] == 2.0 and figures["8"]["generation_speedup_vllm"] == 3.0
    assert figures["32"]["forced_to_full_length"] and not figures["8"]["forced_to_full_length"]
    assert figures["8"]["ours"]["timed_steps"] == 6 and figures["8"]["trl"]["step_s"] == 4.0
    assert figures["8"]["steps_per_process"] == 4 and figures["32"]["steps_per_process"] == 2  # one per length
    assert {steps for _, _, _, steps in order} == {4, 2} and all(steps == (4 if length == 8 else 2)
                                                                for _, length, _, steps in order)
    # alternating: the second repetition runs the sides in the reverse order
    assert [side for side, length, *_ in order if length == 8] == ["ours", "ours_vllm", "trl",
                                                                  "trl", "ours_vllm", "ours"]


@pytest.mark.slow
def test_the_vllm_side_times_real_grpo_steps_with_the_engines_weight_sync(tmp_path, runs_dir):
    """Our stage 2 with use_vllm on a tiny-vllm checkpoint (stage 0 of the recipe, one step), every
    completion forced to the full length through vLLM's `min_tokens`."""
    pytest.importorskip("vllm")
    base = subprocess.run([sys.executable, "-m", "r1pipeline", "--runs-dir", str(runs_dir), "--run", "v", "base",
                           "model.preset=tiny-vllm", "base.max_steps=1", "base.save_steps=1000"],
                          cwd=ROOT, env=pipeline_env(), capture_output=True, text=True, timeout=300)
    assert base.returncode == 0, base.stderr[-3000:]
    sys.path.insert(0, str(ROOT))
    from benchmarks import grpo_step

    run = grpo_step.run_side("ours_vllm", runs_dir / "v" / "base" / "final", 8, True, 2, 2, 3, tmp_path)
    assert run["model"] == "R1MoEForCausalLM" and len(run["steps"]) == 3
    assert all(step["generation_s"] > 0 and step["sync_s"] > 0 for step in run["steps"])
    assert run["mean_completion_length"] == [8.0, 8.0, 8.0]
