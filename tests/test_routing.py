"""MoE routing record and replay (r1pipeline/model/routing.py) on the tiny policy, and the sampling
logprobs the transformers rollout keeps (stages/rollouts.py)."""

import pytest
import torch

from r1pipeline.model import PRESETS, R1MoEConfig, R1MoEForCausalLM, routing
from r1pipeline.model.layers import fp8_compute
from stages.rollouts import SampledLogprobs, length_buckets

VOCAB, PAD, EOS = 48, 0, 1


def tiny_policy(**overrides) -> R1MoEForCausalLM:
    # Two MoE layers of 8 experts (the tiny preset has one), so routes are per layer.
    fields = {**PRESETS["tiny"], "num_hidden_layers": 3, "num_nextn_predict_layers": 0,
              "vocab_size": VOCAB, "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": 2, **overrides}
    config = R1MoEConfig(**fields)
    torch.manual_seed(0)
    model = R1MoEForCausalLM(config)
    model.generation_config.eos_token_id = None  # fixed-length samples; no min_new_tokens processor to skew logits
    return model


def rollout(model, prompts: torch.Tensor, prompt_mask: torch.Tensor, new_tokens: int, perturbed: bool,
            use_cache: bool = True):
    """Sampled completions with the routes and sampling logprobs recorded, FP8 weights if perturbed."""
    sampled = SampledLogprobs(temperature=1.0)
    torch.manual_seed(1)
    with torch.no_grad(), routing.recording(model) as log, (fp8_compute(model) if perturbed else _nothing()):
        out = model.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True, temperature=1.0,
                             top_k=0, max_new_tokens=new_tokens, pad_token_id=PAD, use_cache=use_cache,
                             logits_processor=[sampled])
    return out, log, sampled.finish(out)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def batch():
    prompts = torch.randint(3, VOCAB, (4, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0  # left padding, as TRL pads prompts
    mask[3, :1] = 0
    return prompts.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_replayed_routing_equals_the_recorded_routing_exactly(use_cache):
    """Also without a KV cache, when each generation step recomputes (and re-records) the whole sequence."""
    model = tiny_policy().eval()
    prompts, prompt_mask = batch()
    out, log, _ = rollout(model, prompts, prompt_mask, new_tokens=10, perturbed=True, use_cache=use_cache)
    lengths = [10] * 4
    per_sample = routing.generated_routes(log, prompt_mask, lengths)
    attention = torch.cat([prompt_mask, torch.ones(4, 10, dtype=torch.long)], dim=1)
    rollout_routes = routing.aligned(per_sample, attention)
    assert rollout_routes.shape == (4, 17, 2, 2) and rollout_routes.dtype == routing.ROUTE_DTYPE
    # Every real token has a record except the last sampled one, which generation never fed back.
    recorded = (rollout_routes >= 0).all(-1).all(-1)
    assert torch.equal(recorded, attention.bool() & (torch.arange(17) < 16))

    with torch.no_grad(), routing.recording(model) as free_log:
        model(input_ids=out, attention_mask=attention)
    with torch.no_grad(), routing.replaying(model, rollout_routes), routing.recording(model) as replay_log:
        model(input_ids=out, attention_mask=attention)
    used, free = replay_log[0]
    assert torch.equal(used[recorded], rollout_routes[recorded])
    assert torch.equal(free, free_log[0][0]), "replay must not change what the router would choose"
    # The FP8 rollout routed some tokens otherwise than the fp32 training forward would: the replay
    # above is what made them equal.
    assert routing.mismatch(rollout_routes, free, attention)["router"] > 0
    assert routing.mismatch(rollout_routes, used, attention) == {"router": 0.0, "token": 0.0}


def _loss_and_gate_grads(model, ids, routes, checkpointing: bool):
    model.zero_grad()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    with routing.replaying(model, routes):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # after the replay context closed: a recomputation must still replay
    return [gate.weight.grad.clone() for gate in routing.moe_gates(model)], loss.detach()


def test_gradients_reach_the_router_under_replay_and_recomputation_replays_too():
    model = tiny_policy()
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    # Routes no router would pick by itself: the least-liked experts of every token.
    with torch.no_grad():
        with routing.recording(model) as log:
            model(input_ids=ids)
    routes = (7 - log[0][0].long()).to(routing.ROUTE_DTYPE)
    grads, loss = _loss_and_gate_grads(model, ids, routes, checkpointing=False)
    assert all(grad.abs().sum() > 0 for grad in grads)
    recomputed, loss_ckpt = _loss_and_gate_grads(model, ids, routes, checkpointing=True)
    free, loss_free = _loss_and_gate_grads(model, ids, None, checkpointing=True)
    assert torch.equal(loss, loss_ckpt) and not torch.equal(loss, loss_free)
    for a, b in zip(grads, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sampled_logprobs_are_the_policy_logprobs_of_the_sampled_tokens():
    model = tiny_policy().eval()
    prompts, prompt_mask = batch()
    out, _, logprobs = rollout(model, prompts, prompt_mask, new_tokens=8, perturbed=False)
    attention = torch.cat([prompt_mask, torch.ones(4, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=attention).logits[:, 6:-1]     # predicts tokens 7..14
    expected = logits.log_softmax(-1).gather(2, out[:, 7:, None]).squeeze(2)
    assert logprobs.shape == (4, 8)
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-4)  # KV-cache decode vs one full forward


def test_routes_that_do_not_fit_the_batch_are_refused():
    with pytest.raises(ValueError, match="routes of sample 0 cover 3 tokens, its mask 4"):
        routing.aligned([torch.zeros(3, 1, 2, dtype=routing.ROUTE_DTYPE)], torch.ones(1, 4))


def test_routing_record_is_for_our_policy_only():
    with pytest.raises(TypeError, match="no R1MoEModel"):
        routing.moe_gates(torch.nn.Linear(2, 2))
    dense = tiny_policy(first_k_dense_replace=3)  # the distillation student's shape: every layer dense
    with pytest.raises(TypeError, match="no MoE layer"), routing.recording(dense):
        pass


TEXTS = [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)]


def tiny_trainer(tmp_path, name: str, max_steps: int = 2, beta: float = 0.0):
    """Our GRPO trainer over a tiny 2-MoE-layer policy from one seed (with beta > 0, loaded from a
    checkpoint, where TRL builds the reference model from)."""
    from datasets import Dataset
    from trl import GRPOConfig

    from data import build_tokenizer
    from stages.grpo import ResumableGRPOTrainer

    tokenizer = build_tokenizer(TEXTS)
    tokenizer.padding_side = "left"
    model = tiny_policy(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if beta:
        model.save_pretrained(tmp_path / f"{name}-init")
        model = R1MoEForCausalLM.from_pretrained(tmp_path / f"{name}-init")
    args = GRPOConfig(output_dir=str(tmp_path / name), use_cpu=True, report_to=[], num_generations=4,
                      per_device_train_batch_size=8, max_completion_length=8, max_steps=max_steps, beta=beta,
                      learning_rate=1e-3, logging_steps=1, save_strategy="no", bf16=False, seed=0,
                      vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0)
    return ResumableGRPOTrainer(
        model=model, processing_class=tokenizer, args=args,
        reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
        train_dataset=Dataset.from_dict({"prompt": [t.split("=")[0] + "=" for t in TEXTS[:32]]}))


def grpo_run(tmp_path, name, monkeypatch, single_pass: bool):
    """Two GRPO steps of a tiny 2-MoE-layer policy, FP8 rollouts and R3, from one seed; the trainer's
    forwards per step counted. single_pass=False forces the separate no-grad (old-logprob) pass."""
    from stages.grpo import ResumableGRPOTrainer

    trainer = tiny_trainer(tmp_path, name)
    trainer.configure_rollouts({"routing_replay": "r3", "rollout_precision": "fp8"})
    monkeypatch.setattr(trainer, "_single_pass", lambda: single_pass)
    forwards = []
    real = ResumableGRPOTrainer._get_per_token_logps_and_entropies

    def counted(self, *args, **kwargs):
        forwards.append(torch.is_grad_enabled())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ResumableGRPOTrainer, "_get_per_token_logps_and_entropies", counted)
    trainer.train()
    monkeypatch.undo()
    logged = [row for row in trainer.state.log_history if "sampling/kl_k3" in row]
    return trainer.model, logged, forwards


def test_on_policy_the_mismatch_comes_from_the_training_forward_alone(tmp_path, monkeypatch):
    """On-policy, the importance ratio, the mismatch metrics and the trainer's routes are taken from the
    loss's own forward: one forward per step instead of two, and the same training and figures as with
    TRL's separate no-grad pass (up to float rounding between a no-grad and a grad forward)."""
    single, single_logged, single_forwards = grpo_run(tmp_path, "single", monkeypatch, single_pass=True)
    double, double_logged, double_forwards = grpo_run(tmp_path, "double", monkeypatch, single_pass=False)
    assert single_forwards == [True, True] and double_forwards == [False, True, False, True]
    assert len(single_logged) == len(double_logged) == 2
    for a, b in zip(single_logged, double_logged):
        assert a["routing/router_mismatch"] == b["routing/router_mismatch"] == 0  # R3 replays the rollout's
        assert a["routing/router_mismatch_free"] == b["routing/router_mismatch_free"] > 0  # FP8 routed otherwise
        assert a["sampling/kl_k3"] > 0 and a["sampling/importance_sampling_ratio/max"] <= 2.0
        for name in ("sampling/kl_k3", "sampling/abs_dlogp_mean", "sampling/is_clip_frac", "routing/bytes",
                     "sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/min",
                     "sampling/importance_sampling_ratio/max", "sampling/sampling_logp_difference/mean",
                     "sampling/sampling_logp_difference/max", "loss", "reward"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-7), name
    for (name, p), q in zip(single.named_parameters(), double.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_length_buckets_are_the_cheapest_cut_of_the_sorted_rows():
    """Against every way of cutting the rows, sorted by width, into runs: the dynamic program's cost is the least."""
    import itertools

    widths, prompt, overhead = [9, 2, 30, 3, 31, 8, 1], 5, 12
    order = sorted(range(len(widths)), key=widths.__getitem__)

    def cost(groups):
        return sum(len(g) * (prompt + max(widths[i] for i in g)) + overhead for g in groups)

    for max_rows in (7, 3):
        groups = length_buckets(widths, prompt, max_rows, overhead)
        assert sorted(i for g in groups for i in g) == list(range(7)) and all(len(g) <= max_rows for g in groups)
        cuts = [c for n in range(7) for c in itertools.combinations(range(1, 7), n)]
        runs = [[order[a:b] for a, b in zip((0, *cut), (*cut, 7))] for cut in cuts]
        assert cost(groups) == min(cost(r) for r in runs if all(len(g) <= max_rows for g in r))
    assert length_buckets(widths, prompt, 7, overhead) == [[6, 1, 3], [5, 0], [2, 4]]
    assert length_buckets(widths, prompt, 3, None) == [[0, 1, 2], [3, 4, 5], [6]]  # TRL's chunks


@pytest.mark.parametrize("replay", [False, True], ids=["free", "replayed"])
def test_the_forward_by_completion_length_changes_no_logprob_gradient_or_route(tmp_path, replay):
    """The training forward over rows grouped by completion length, each group cut after its longest, and
    each distinct prompt computed once, gives the logprobs, entropies, gradients, recorded routes and
    routing-bias load counts of TRL's one forward over the padded batch."""
    trainer = tiny_trainer(tmp_path, "buckets")
    model = trainer.model.train()
    B, P, T = 12, 5, 9
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, model.config.vocab_size, (B, P + T), generator=generator)
    ids[1:4, :P] = ids[0, :P]     # rows 0-3 share a prompt, as do rows 4-7 (left-padded), and 8-10
    ids[5:8, :P] = ids[4, :P]
    ids[9:11, :P] = ids[8, :P]
    widths = torch.tensor([1, 9, 2, 3, 9, 4, 8, 2, 7, 1, 5, 6])
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), (torch.arange(T) < widths[:, None]).long()], dim=1)
    mask[4:8, :2] = 0
    mask[11, :1] = 0
    routes = None
    if replay:  # the least-liked experts of every real token
        with torch.no_grad(), routing.recording(model) as log:
            model(input_ids=ids, attention_mask=mask)
        routes = (7 - log[0][0].long()).to(routing.ROUTE_DTYPE).masked_fill(~mask.bool()[..., None, None],
                                                                             routing.NO_ROUTE)
    results, calls = {}, []
    real_forward = model.forward
    model.forward = lambda *args, **kwargs: calls.append(kwargs["input_ids"].shape) or real_forward(*args, **kwargs)
    for overhead in (None, 0):
        trainer.bucket_overhead_tokens = overhead
        model.zero_grad()
        for gate in routing.moe_gates(model):
            gate.expert_load.zero_()
        calls.clear()
        (logps, entropies, _), train_routes = trainer._forward_by_length(
            model, ids, mask, T, None, routes, True, {"compute_entropy": True})
        (logps * mask[:, P:]).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        loads = [gate.expert_load.clone() for gate in routing.moe_gates(model)]
        results[overhead] = logps.detach(), entropies.detach(), grads, train_routes, loads, list(calls)
    whole, grouped = results[None], results[0]
    assert whole[5] == [(B, P + T)]
    assert grouped[5][0] == (4, P - 1) and sum(shape[0] for shape in grouped[5][1:]) == B  # 4 distinct prompts
    real = mask[:, P:].bool()
    torch.testing.assert_close(grouped[0][real], whole[0][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped[1][real], whole[1][real], rtol=1e-5, atol=1e-5)
    assert torch.equal(grouped[0][~real], torch.zeros_like(grouped[0][~real]))
    assert len(grouped[2]) == len(whole[2]) > 0
    for a, b in zip(grouped[2], whole[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # summed in another order
    beyond = torch.arange(P + T) >= P + widths[:, None]  # past a row's last completion token: not computed
    cut = mask.bool() & ~beyond
    for a, b in zip(grouped[3], whole[3]):
        assert torch.equal(a[cut], b[cut]) and bool((a[beyond] == routing.NO_ROUTE).all())
    if replay:
        assert torch.equal(grouped[3][0][cut], routes[cut])
    for a, b in zip(grouped[4], whole[4]):
        assert torch.equal(a, b) and a.sum() > 0


def test_the_reference_model_of_our_policy_is_of_our_class(tmp_path):
    """TRL builds the reference (beta > 0) by the checkpoint's `architectures`, transformers' DeepseekV3ForCausalLM
    for ours; our trainer builds it of our class, so the KL compares the policy with itself, not with another
    implementation of the same weights."""
    import json

    import transformers

    trainer = tiny_trainer(tmp_path, "reference", beta=0.04)
    assert type(trainer.ref_model) is R1MoEForCausalLM
    for (name, p), q in zip(trainer.model.named_parameters(), trainer.ref_model.parameters()):
        assert torch.equal(p, q), name
    saved = json.loads((tmp_path / "reference-init" / "config.json").read_text())
    assert saved["architectures"] == [transformers.DeepseekV3ForCausalLM.__name__]  # what TRL alone would build
