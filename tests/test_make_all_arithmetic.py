"""benchmarks/make_all_arithmetic.py: the counting rules of its lower bound, on a run directory written
here (manifests and metrics as the stages write them; the figures themselves are the benchmark's), and
its refusal of an unfinished run before any work."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, pipeline_env

sys.path.insert(0, str(ROOT))
from benchmarks import make_all_arithmetic as arithmetic  # noqa: E402

STAGES = ("base", "sft", "grpo", "rejection", "align", "distill")


def fake_run(tmp_path):
    """A finished run's files: every stage's manifest and metrics, sft's and distill's final checkpoints."""
    from data import build_tokenizer
    from r1pipeline import policy

    run = tmp_path / "runs" / "r"
    tokenizer = build_tokenizer(["What is 12 + 34?", "Think step by step. User: 1 + 2"])
    for stage in STAGES:
        directory = run / stage
        directory.mkdir(parents=True)
        section = {"max_steps": 10, "per_device_train_batch_size": 4, "beta": 0.04 if stage == "align" else 0.0}
        config = {stage: section, "data": {"system_prompt": "Think step by step."}}
        (directory / "manifest.json").write_text(json.dumps({"config": config, "wall_time_s": 100.0}))
        rows = ([{"step": s, "completions/mean_length": 10.0 + s} for s in (1, 2)] if stage in ("grpo", "align")
                else [{"step": 5, "num_tokens": 500.0}, {"step": 10, "num_tokens": 1000.0}])
        (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    policy.build_from_preset("tiny", {"num_nextn_predict_layers": 0}, tokenizer, seed=0).save_pretrained(
        run / "sft" / "final")
    tokenizer.save_pretrained(run / "sft" / "final")
    policy.build_from_preset("tiny-dense", {}, tokenizer, seed=0).save_pretrained(run / "distill" / "final")
    return run


def test_every_stage_counts_no_more_than_it_computed(tmp_path):
    run = fake_run(tmp_path)
    rate = 1e8
    figures = arithmetic.run_arithmetic(run, rate)
    stages, shared = figures["stages"], figures["shared_prompt_tokens"]
    assert shared > 0
    assert stages["base"]["tokens"] == 1000                               # packed, nothing shared
    for stage in ("sft", "rejection", "distill"):
        assert stages[stage]["tokens"] == 1000 - 10 * 4 * shared          # the last num_tokens, less the prefix
    assert stages["grpo"]["tokens"] == stages["align"]["tokens"] == (11 + 12) * 4  # completion tokens only
    per_token = figures["mflop_per_training_token"]
    for stage, preset in (("sft", "tiny"), ("distill", "tiny-dense")):  # each from its own checkpoint's config
        config = arithmetic.config_from_checkpoint(json.loads((run / stage / "final" / "config.json").read_text()))
        assert config.first_k_dense_replace == (2 if preset == "tiny-dense" else 1)
        assert per_token[stage] == round(arithmetic.step_flops(config) / (32 * 80) / 1e6, 2)
    forward = figures["mflop_per_forward_token"]
    assert stages["align"]["gflop"] == pytest.approx(92 * (per_token["sft"] + 2 * forward) / 1e3, rel=1e-2)
    assert stages["grpo"]["gflop"] == pytest.approx(92 * (per_token["sft"] + forward) / 1e3, rel=1e-2)
    total = sum(stage["gflop"] for stage in stages.values())
    assert figures["lower_bound_s"] == pytest.approx(total * 1e9 / rate, rel=1e-2)
    assert figures["stages_wall_s"] == 600.0


def test_a_training_step_counts_forward_and_backward():
    config = arithmetic.policy_config()
    forward = arithmetic.step_flops(config, length=16, batch=2, train=False)
    step = arithmetic.step_flops(config, length=16, batch=2)
    assert 2.5 * forward < step < 5 * forward


def test_an_unfinished_run_is_refused_before_any_work(tmp_path):
    (tmp_path / "r" / "base").mkdir(parents=True)
    (tmp_path / "r" / "base" / "manifest.json").write_text("{}")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_all_arithmetic.py"), "--run",
                           str(tmp_path / "r"), "--out", str(tmp_path / "out.json")],
                          env=pipeline_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no finished stage(s) sft, rejection, distill, grpo, align" in done.stderr
    assert not (tmp_path / "out.json").exists()


def test_without_a_finished_run_it_measures_the_training_step_only(tmp_path, monkeypatch, capsys):
    """As `make bench` runs it on a fresh clone: no runs/default, so part 1 alone."""
    monkeypatch.setattr(arithmetic, "ROOT", tmp_path)
    out = tmp_path / "out.json"
    arithmetic.main(["--reps", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert "run" not in record and "no finished `make all` there" in capsys.readouterr().err
    step = record["training_step"]
    assert step["gflop"] > 0 and step["gflop_per_s"] == pytest.approx(step["gflop"] / step["seconds"], rel=1e-2)
    assert 0 < record["step_share_of_gemm_rate"] < 1.5
