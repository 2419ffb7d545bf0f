"""GRPO with `use_vllm` in colocate mode on the real engine (vLLM's CPU build, in this process, built
by TRL's VLLMGeneration): after every weight sync the engine holds exactly the trainer's weights and
gives its logprobs; a sync that fails, hangs or lands wrong values stops the run with an error and
never lets the engine generate from what it holds."""

import os
import threading
import time

import pytest

pytest.importorskip("vllm")  # `make install` installs it on CPU machines; GPU ones add the gpu extra
import torch
from datasets import Dataset
from trl import GRPOConfig

from data import build_tokenizer
from r1pipeline import policy, vllm_engine
from stages.grpo import CheckpointFormatVLLM, ResumableGRPOTrainer, WeightSyncError

TEXTS = [f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)]
SEQUENCE = "12 + 34 = 46 and 5 + 6 = 11, then 27 + 19 = 46"


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A GRPO trainer on a tiny-vllm checkpoint, its colocated engine built by TRL. TRL sets
    RANK/WORLD_SIZE/MASTER_* for vLLM in os.environ; they are restored afterwards."""
    environ = dict(os.environ)
    tokenizer = build_tokenizer(TEXTS)
    tokenizer.padding_side = "left"
    path = tmp_path_factory.mktemp("policy")
    policy.build_from_preset("tiny-vllm", {}, tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), use_vllm=True, vllm_mode="colocate",
                      use_cpu=True, report_to=[], num_generations=4, per_device_train_batch_size=8,
                      max_completion_length=8, max_steps=3, learning_rate=1e-3, logging_steps=1,
                      vllm_max_model_length=128, save_strategy="no", bf16=False)  # TRL defaults to bf16 autocast
    built = ResumableGRPOTrainer(
        model=policy.load_pretrained(str(path)), processing_class=tokenizer, args=args,
        reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
        train_dataset=Dataset.from_dict({"prompt": [t.split("=")[0] + "=" for t in TEXTS[:48]]}))
    yield built
    vllm_engine.shutdown(built.vllm_generation.llm)
    os.environ.clear()
    os.environ.update(environ)


def engine_gap(trainer) -> tuple[list[str], float]:
    """(tensors where engine and trainer differ, max |Δlogp| of a fixed sequence between them)."""
    ids = trainer.processing_class(SEQUENCE, add_special_tokens=False)["input_ids"]
    llm, model = trainer.vllm_generation.llm, trainer.model
    delta = vllm_engine.prompt_logprobs(llm, ids) - vllm_engine.model_logprobs(model, ids)
    return vllm_engine.sync_mismatches(llm, model), delta.abs().max().item()


def test_engine_equals_trainer_after_every_sync_of_a_grpo_run(trainer, monkeypatch):
    generation = trainer.vllm_generation
    assert type(generation) is CheckpointFormatVLLM and generation.verify_sync
    gaps, real_sync = [], CheckpointFormatVLLM.sync_weights

    def checked_sync(self):
        real_sync(self)
        gaps.append((trainer.state.global_step, *engine_gap(trainer)))

    monkeypatch.setattr(CheckpointFormatVLLM, "sync_weights", checked_sync)
    forwards, real_forward = [], ResumableGRPOTrainer._get_per_token_logps_and_entropies

    def counted(self, *args, **kwargs):
        forwards.append(torch.is_grad_enabled())
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(ResumableGRPOTrainer, "_get_per_token_logps_and_entropies", counted)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert [step for step, _, _ in gaps] == [0, 1, 2]            # a sync before each step's rollouts
    # On-policy, TRL's importance ratio comes from the training forward itself: no no-grad "old-logprob"
    # pass over the batch (which TRL runs at every step with vLLM), one forward per step.
    assert trainer._measured_in_loss() and forwards == [True, True, True]
    assert all(mismatches == [] for _, mismatches, _ in gaps)    # bit-exact, every tensor
    assert all(delta < 1e-4 for _, _, delta in gaps), gaps
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())  # it trained

    logged = [row for row in trainer.state.log_history if "sampling/kl_k3" in row]
    assert len(logged) == 3
    for row in logged:  # fp32 engine and trainer: the sampled tokens' logprobs agree, so k3 is ~0
        assert 0 <= row["sampling/kl_k3"] < 1e-6 and row["sampling/frac_dlogp_gt_ln2"] == 0
        assert row["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3)
        assert 0 < row["sampling/sampling_logp_difference/mean"] <= row["sampling/sampling_logp_difference/max"] < 1e-3


def failing_weights(model, after: int, failure):
    """model.vllm_weights(), cut off after `after` tensors by `failure()` (raise or block)."""
    real = model.vllm_weights

    def weights():
        for index, pair in enumerate(real()):
            if index == after:
                failure()
            yield pair

    return weights


def restore(trainer) -> None:
    """A good sync after a failed one (only tests do this: a run stops at the failure)."""
    trainer.vllm_generation._sync_failed = None
    trainer.vllm_generation.sync_weights()
    assert engine_gap(trainer)[0] == []


def test_a_sync_that_fails_midway_raises_and_the_engine_refuses_to_generate(trainer, monkeypatch):
    def fail():
        raise ConnectionError("transfer lost")

    monkeypatch.setattr(trainer.model, "vllm_weights", failing_weights(trainer.model, 10, fail))
    with pytest.raises(WeightSyncError, match="failed: ConnectionError"):
        trainer.vllm_generation.sync_weights()
    with pytest.raises(WeightSyncError, match="unusable after a weight sync that never finished"):
        trainer.vllm_generation.generate([[1, 2, 3]], None, num_generations=1)
    monkeypatch.undo()
    restore(trainer)


def test_a_hung_sync_raises_within_its_timeout(trainer, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(trainer.model, "vllm_weights", failing_weights(trainer.model, 10, release.wait))
    monkeypatch.setattr(trainer.vllm_generation, "sync_timeout", 2.0)
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"did not finish within 2 s"):
        trainer.vllm_generation.sync_weights()
    assert time.monotonic() - start < 10
    with pytest.raises(WeightSyncError, match="unusable"):
        trainer.vllm_generation.generate([[1, 2, 3]], None, num_generations=1)
    release.set()
    for thread in threading.enumerate():
        if thread.name == "vllm-weight-sync":
            thread.join(60)
    monkeypatch.undo()
    restore(trainer)


def test_a_sync_that_lands_wrong_values_is_caught_by_the_read_back(trainer, monkeypatch):
    """A sync that 'succeeds' but leaves other values in the engine (trl#5312's silent failure), here
    one expert's weight scaled: the read-back names the tensor and the run stops."""
    real = trainer.vllm_generation._iter_named_params  # what the sync streams; the read-back compares
                                                        # with the trainer's own weights
    def corrupted():
        for name, tensor in real():
            yield name, tensor * 1.5 if name == "model.layers.1.mlp.experts.3.up_proj.weight" else tensor

    monkeypatch.setattr(trainer.vllm_generation, "_iter_named_params", corrupted)
    with pytest.raises(WeightSyncError, match=r"differs from the trainer in 1 tensors: "
                                              r"model\.layers\.1\.mlp\.experts\.w13_weight"):
        trainer.vllm_generation.sync_weights()
    monkeypatch.undo()
    restore(trainer)
