"""benchmarks/moe_rl.py refuses bad arguments before any work (its SFT run alone takes minutes).
The figures themselves are the benchmark's."""

import subprocess
import sys

import pytest

from conftest import ROOT, pipeline_env


@pytest.mark.parametrize("args, said", [
    (["--grpo-seeds", "0,one"], "--grpo-seeds: '0,one' is not a comma-separated list of integers"),
    (["--variants", "baseline,fp9"], "--variants: unknown ['fp9']"),
])
def test_bad_arguments_are_refused_before_any_work(args, said, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_rl.py"), "--runs-dir", str(tmp_path), *args],
                          env=pipeline_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not any(tmp_path.iterdir())  # no run was started


def test_the_mismatch_rollout_decodes_with_a_kv_cache_as_the_trainer_does(monkeypatch):
    """A checkpoint a Trainer saved has config.use_cache=False; the trainer's rollout decodes with a cache
    anyway (stages/grpo.py), so the benchmark's must too, or it measures another decoding (no absorbed
    MLA step) than the one it stands for."""
    import torch

    from benchmarks import moe_rl
    from r1pipeline.model import PRESETS, R1MoEConfig, R1MoEForCausalLM
    from r1pipeline.model.layers import MLA

    config = R1MoEConfig(**{**PRESETS["tiny"], "num_nextn_predict_layers": 0, "vocab_size": 48, "pad_token_id": 0,
                            "eos_token_id": 1, "bos_token_id": 2, "use_cache": False})
    torch.manual_seed(0)
    model = R1MoEForCausalLM(config).eval()
    steps = []
    absorbed = MLA.absorbed_decode
    monkeypatch.setattr(MLA, "absorbed_decode", lambda self, *a: steps.append(1) or absorbed(self, *a))
    prompts = torch.randint(3, 48, (2, 5))
    moe_rl.generate(model, prompts, torch.ones_like(prompts), max_new_tokens=4, fp8=True, seed=0)
    assert steps  # decoding steps attended over a cache


def test_merge_refuses_a_record_of_other_runs_before_any_work(tmp_path):
    """--merge gathers seeds only from the same GRPO steps and an SFT checkpoint of the same steps and shape."""
    import json

    sft = tmp_path / "sft" / "final"
    sft.mkdir(parents=True)
    (sft.parent / "stage_config.json").write_text(json.dumps(
        {"config": {"sft": {"max_steps": 1200}, "model": {"config": {"num_hidden_layers": 3}}}}))
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps({"sft_steps": 1200, "model_config": {"num_hidden_layers": 4},
                                    "grpo": {"steps": 150, "runs": {}}}))
    runs = tmp_path / "runs"
    runs.mkdir()
    script = [sys.executable, str(ROOT / "benchmarks" / "moe_rl.py"), "--runs-dir", str(runs)]
    for args, said in [
        (["--merge", str(previous)], "--merge gathers GRPO seeds from the same checkpoint: it needs --sft"),
        (["--merge", str(tmp_path / "none.json"), "--sft", str(sft)], "No such file"),
        (["--merge", str(previous), "--sft", str(sft), "--grpo-steps", "100"],
         "it differs in grpo steps 150 (this run: 100), model config {'num_hidden_layers': 4} "
         "(this run: {'num_hidden_layers': 3})"),
    ]:
        done = subprocess.run(script + args, env=pipeline_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not any(runs.iterdir())


def test_grpo_runs_go_seed_by_seed_and_gather_carried_seeds(monkeypatch, tmp_path):
    """Every variant of a seed runs before the next seed (a stopped invocation leaves whole pairs); a carried
    seed is kept unless run again; each variant is compared with the baseline at the seeds both have."""
    from benchmarks import moe_rl

    order = []
    score = {("baseline", 5): 0.50, ("fp8_rollout_r3", 5): 0.53, ("baseline", 6): 0.60, ("fp8_rollout_r3", 6): 0.58}
    monkeypatch.setattr(moe_rl, "grpo_run", lambda runs, sft, steps, name, seed:
                        order.append((name, seed)) or {"pass@1": score[name, seed]})
    carried = {"baseline": {"0": {"pass@1": 0.61}, "5": {"pass@1": 0.0}},
               "fp8_rollout_r3": {"0": {"pass@1": 0.47}}, "fp8_rollout": {"0": {"pass@1": 0.2}}}
    results = moe_rl.grpo_runs(tmp_path, tmp_path, 150, ["baseline", "fp8_rollout_r3"], [5, 6], carried)
    assert order == [("baseline", 5), ("fp8_rollout_r3", 5), ("baseline", 6), ("fp8_rollout_r3", 6)]
    assert list(results) == ["baseline", "fp8_rollout_r3"]
    assert list(results["baseline"]["seeds"]) == ["0", "5", "6"]
    assert results["baseline"]["seeds"]["5"]["pass@1"] == 0.50  # run now, the carried one replaced
    assert results["baseline"]["pass@1_mean"] == pytest.approx((0.61 + 0.50 + 0.60) / 3)
    versus = results["fp8_rollout_r3"]["vs_baseline"]
    assert versus["seeds"] == ["0", "5", "6"] and versus["diff_points"] == pytest.approx([-14, 3, -2])
    mean = (-14 + 3 - 2) / 3
    se = ((((-14 - mean) ** 2 + (3 - mean) ** 2 + (-2 - mean) ** 2) / 2) / 3) ** 0.5
    assert versus["mean_points"] == pytest.approx(mean) and versus["se_points"] == pytest.approx(se)
    assert versus["ci95_points"] == pytest.approx([mean - 4.303 * se, mean + 4.303 * se])  # t, 2 degrees of freedom
