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
