"""vLLM weight sync in GRPO (stages 2 and 4): contract tests for what the CPU engine here cannot run.
The real engine's sync is tested in tests/test_vllm_grpo.py; it needs the MLA shape vLLM's CPU build
serves (kv_lora_rank + rope = 576), which FP8's 128-multiples exclude, and server mode's NCCL weight
transfer needs GPUs. So a real ResumableGRPOTrainer is built with `use_vllm=True` on the tiny preset
(FP8-capable) and only the vLLM engine (colocated `LLM`) or its client (server mode) is replaced by a
recording test double. What reaches the double is what TRL's own sync path would hand vLLM."""

import contextlib

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from trl import GRPOConfig
from trl.generation.vllm_generation import VLLMGeneration

from data import build_tokenizer
from r1pipeline.model import PRESETS, R1MoEConfig, R1MoEForCausalLM
from stages import grpo
from stages.grpo import CheckpointFormatVLLM, ResumableGRPOTrainer

TEXTS = [f"{a} + {b} = {a + b}" for a in range(10) for b in range(10)]


def build(tokenizer, seed=0, **overrides) -> R1MoEForCausalLM:
    """The tiny preset, as tests/test_model.py builds it: a non-zero routing bias, so that the bias
    buffer is checked to arrive too."""
    torch.manual_seed(seed)
    model = R1MoEForCausalLM(R1MoEConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                         **{**PRESETS["tiny"], **overrides}))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    return model


class FakeLLM:
    """Test double for `vllm.LLM` (colocate mode): records what reaches its model runner."""

    def __init__(self):
        self.reloaded, self.loaded, self.prefix_cache_resets = [], [], 0
        model = torch.nn.Module()
        model.load_weights = lambda weights: self.loaded.extend(weights)
        runner = type("Runner", (), {"model": model, "reload_weights": self._reload_weights})()
        worker = type("Worker", (), {"model_runner": runner})()
        self.llm_engine = type("Engine", (), {"model_executor": type("Executor", (), {"driver_worker": worker})()})()

    def _reload_weights(self, weights_iterator, is_checkpoint_format):
        assert is_checkpoint_format
        self.reloaded.extend((name, tensor.clone()) for name, tensor in weights_iterator)

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1


class FakeVLLMClient:
    """Test double for TRL's `VLLMClient` (server mode): records the announced metadata, the streamed
    tensors and the prefix-cache resets instead of broadcasting over NCCL."""

    def __init__(self):
        self.metadata, self.streamed, self.prefix_cache_resets = None, [], 0

    def get_server_info(self):
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def update_named_params(self, metadata, named_params):
        self.metadata = metadata
        self.streamed.extend((name, tensor.clone()) for name, tensor in named_params)

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1


def fake_init_vllm(self):
    """Replaces VLLMGeneration._init_vllm, the one place TRL starts vLLM or connects to its server."""
    if self.mode == "server":
        self.vllm_client = FakeVLLMClient()
    else:
        self.llm = FakeLLM()


def grpo_trainer(tmp_path, monkeypatch, tokenizer, model, vllm_mode):
    monkeypatch.setattr(VLLMGeneration, "_init_vllm", fake_init_vllm)
    # No real engine starts, so none of its settings (nor its CPU shape check) apply.
    monkeypatch.setattr(grpo, "colocated_engine_settings", lambda args, model: contextlib.nullcontext())
    args = GRPOConfig(output_dir=str(tmp_path), use_vllm=True, vllm_mode=vllm_mode, use_cpu=True, report_to=[],
                      num_generations=4, per_device_train_batch_size=4, max_completion_length=8, max_steps=1)
    return ResumableGRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                args=args, processing_class=tokenizer,
                                train_dataset=Dataset.from_dict({"prompt": [t.split("=")[0] for t in TEXTS[:8]]}))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS)


@pytest.mark.parametrize("fp8", [False, True])
def test_synced_tensors_are_the_checkpoint_vllm_reads(tmp_path, monkeypatch, tokenizer, fp8):
    """Test double for vLLM (FP8 and the tiny preset do not run on its CPU build). vLLM's DeepSeek-V3
    loader reads the tensors of the saved checkpoint; the sync must push exactly those names, shapes and dtypes (FP8: e4m3 weights
    plus fp32 `weight_scale_inv`), less the MTP layer, which vLLM skips unless speculating."""
    model = build(tokenizer, fp8=fp8)
    trainer = grpo_trainer(tmp_path, monkeypatch, tokenizer, model, "colocate")
    pushed = {name: (tuple(t.shape), t.dtype) for name, t in trainer.vllm_generation._iter_named_params()}
    model.save_pretrained(tmp_path / "checkpoint")
    mtp = f"model.layers.{model.config.num_hidden_layers}."
    with safe_open(tmp_path / "checkpoint" / "model.safetensors", "pt") as f:
        on_disk = {name: (tuple(f.get_slice(name).get_shape()), f.get_tensor(name).dtype)
                   for name in f.keys() if not name.startswith(mtp)}
    assert pushed == on_disk
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in pushed
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in pushed
    if fp8:
        assert pushed["model.layers.1.mlp.experts.0.gate_proj.weight"][1] == torch.float8_e4m3fn
        assert "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv" in pushed


def test_colocate_sync_reloads_vllm_weights_in_checkpoint_format(tmp_path, monkeypatch, tokenizer):
    """Test double for vLLM (the tiny preset does not run on its CPU build): a fake `LLM` whose model
    runner records `reload_weights`. The colocated engine must get `vllm_weights()`'s pairs, tensors equal, through
    the checkpoint-format reload (not the plain `load_weights` TRL uses, which would leave MLA's
    absorbed matrices stale), then a prefix-cache reset."""
    model = build(tokenizer)
    trainer = grpo_trainer(tmp_path, monkeypatch, tokenizer, model, "colocate")
    assert type(trainer.vllm_generation) is CheckpointFormatVLLM
    trainer.vllm_generation.verify_sync = False  # nothing to read back from a double
    with torch.no_grad():  # a trained step's worth of change, so that the sync is seen to send current values
        model.model.layers[1].mlp.experts.down_proj.add_(0.5)
    trainer.vllm_generation.sync_weights()
    llm = trainer.vllm_generation.llm
    expected = list(model.vllm_weights())
    assert [name for name, _ in llm.reloaded] == [name for name, _ in expected]
    assert all(torch.equal(got, want) for (_, got), (_, want) in zip(llm.reloaded, expected))
    assert llm.loaded == [] and llm.prefix_cache_resets == 1


def test_server_sync_streams_vllm_weights_then_resets_prefix_cache(tmp_path, monkeypatch, tokenizer):
    """Test double for vLLM (the tiny preset does not run on its CPU build): a fake TRL `VLLMClient`
    records the metadata the server is told to expect, the streamed tensors and the prefix-cache reset. TRL's own server path
    runs unchanged, only over `vllm_weights()`'s pairs."""
    model = build(tokenizer, fp8=True)
    trainer = grpo_trainer(tmp_path, monkeypatch, tokenizer, model, "server")
    trainer.vllm_generation.sync_weights()
    client = trainer.vllm_generation.vllm_client
    expected = list(model.vllm_weights())
    assert client.metadata == [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in expected]
    assert [name for name, _ in client.streamed] == [name for name, _ in expected]
    assert all(torch.equal(got, want) for (_, got), (_, want) in zip(client.streamed, expected))
    assert client.prefix_cache_resets == 1


def test_other_models_keep_trls_sync(tmp_path, monkeypatch, tokenizer):
    """Test double for vLLM (the tiny preset does not run on its CPU build). A model that is not our
    policy (transformers' own DeepseekV3ForCausalLM) keeps TRL's VLLMGeneration and its `named_parameters()` stream."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                   **PRESETS["tiny"]))
    trainer = grpo_trainer(tmp_path, monkeypatch, tokenizer, model, "colocate")
    assert type(trainer.vllm_generation) is VLLMGeneration
    trainer.vllm_generation.sync_weights()
    loaded = [name for name, _ in trainer.vllm_generation.llm.loaded]
    assert loaded == [name for name, _ in model.named_parameters()]


class FakeZeRO3:
    """Test double for DeepSpeed ZeRO-3 (not a dependency; its trainer path fails on TRL's fused LM head,
    README "Sharded training"): each parameter's data is replaced by an empty shard, as ZeRO-3 leaves
    it outside a gather, and `gathered` (in the place of TRL's `gather_params`, which enters
    `deepspeed.zero.GatheredParameters` under ZeRO-3) puts the whole tensors back for the while."""

    def __init__(self, model):
        self.whole = {param: param.data for param in model.parameters()}
        self.gathers = 0
        self.partition()

    def partition(self):
        for param in self.whole:
            param.data = torch.empty(0, dtype=param.dtype)

    @contextlib.contextmanager
    def gathered(self, params):
        self.gathers += 1
        for param in params:
            param.data = self.whole[param]
        try:
            yield
        finally:
            self.partition()


def test_the_sync_gathers_zero3_shards_before_reading_the_policy(tmp_path, monkeypatch, tokenizer):
    """The colocated sync under ZeRO-3 (a test double: see FakeZeRO3) reads every tensor inside TRL's
    gather, so the engine gets whole weights, not the empty local shards."""
    model = build(tokenizer)
    trainer = grpo_trainer(tmp_path, monkeypatch, tokenizer, model, "colocate")
    expected = [(name, tensor.clone()) for name, tensor in model.vllm_weights()]
    fake = FakeZeRO3(model)
    monkeypatch.setattr(trainer.vllm_generation._dist, "gather_params", fake.gathered)
    with pytest.raises((RuntimeError, IndexError)):
        list(model.vllm_weights())  # the negative control: outside a gather the shards are empty
    got = list(trainer.vllm_generation._iter_named_params())
    assert fake.gathers == 1 and [name for name, _ in got] == [name for name, _ in expected]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected))
