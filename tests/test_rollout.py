"""r1pipeline.rollout: grouped generation with transformers `generate` on a small randomly initialised
policy of our MoE (CPU, seconds), resume after a kill, argument checks. The vLLM backend runs on the
real engine in tests/test_vllm_engine.py."""

import json
import sys

import pytest
import torch

from data import build_tokenizer, render_completion, render_prompt
from r1pipeline import policy
from r1pipeline.rollout import Workers, read_samples, rollout

QUESTIONS = [f"What is {a} + {b}?" for a in range(12) for b in range(3)]
# Narrower than the tiny preset, so that a test generates in well under a second.
SMALL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=2,
             num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
             v_head_dim=16)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(render_prompt(q) + render_completion("add", "1") for q in QUESTIONS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return policy.build_from_preset("tiny", SMALL, tokenizer, seed=0).eval()


def rows(n=6):
    """Prompts of different lengths, not in length order, with an extra column."""
    return [{"id": f"q{i}", "prompt": render_prompt(QUESTIONS[i] + " Explain." * (i % 3)), "gold": str(i)}
            for i in range(n)]


def run(model, tokenizer, data, **kwargs):
    return rollout(data, model=model, tokenizer=tokenizer, **{"num_samples": 3, "max_new_tokens": 6, **kwargs})


def count_generated(monkeypatch, model) -> list[int]:
    """Wrap model.generate; the returned list grows by each call's number of sequences."""
    calls, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(len(kw["input_ids"])) or real(**kw))
    return calls


def test_one_record_per_row_in_order_with_columns_carried(model, tokenizer):
    model.train()
    data = rows(7)
    out = run(model, tokenizer, data, batch_size=6)  # 2 prompts a batch: 4 batches
    assert [r["id"] for r in out] == [r["id"] for r in data]
    for row, record in zip(data, out):
        assert record["gold"] == row["gold"] and record["prompt"] == row["prompt"]
        assert len(record["completions"]) == len(record["completion_lengths"]) == 3
        assert all(isinstance(text, str) for text in record["completions"])
        assert all(1 <= n <= 6 for n in record["completion_lengths"])
    assert model.training  # the caller's mode is restored
    model.eval()


def test_completion_text_and_length_stop_at_eos(model, tokenizer, monkeypatch):
    """Lengths count up to and including EOS; the padding after it is neither counted nor decoded."""
    a, b = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def fake_generate(input_ids, **kwargs):
        tails = torch.tensor([[a, b, eos, pad], [a, a, a, a]])
        return torch.cat([input_ids, tails[:len(input_ids)]], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    [record] = run(model, tokenizer, rows(1), num_samples=2)
    assert record["completions"] == ["<think></think>", "<think>" * 4]
    assert record["completion_lengths"] == [3, 4]


def test_left_padding_leaves_a_greedy_completion_unchanged(model, tokenizer):
    short, long = rows(3)[0], rows(3)[2]
    assert len(long["prompt"]) > len(short["prompt"])
    options = dict(num_samples=1, max_new_tokens=12, temperature=0)
    alone = run(model, tokenizer, [short], **options)[0]
    batched = run(model, tokenizer, [long, short], batch_size=2, **options)[1]
    assert batched["completions"] == alone["completions"]
    assert batched["completion_lengths"] == alone["completion_lengths"]


def test_temperature_zero_is_greedy(model, tokenizer):
    first = run(model, tokenizer, rows(), temperature=0, seed=1)
    again = run(model, tokenizer, rows(), temperature=0, seed=2)
    assert first == again
    assert all(len(set(record["completions"])) == 1 for record in first)


def test_a_fixed_seed_gives_the_same_samples(model, tokenizer):
    first = run(model, tokenizer, rows(), seed=7)
    assert run(model, tokenizer, rows(), seed=7) == first
    assert run(model, tokenizer, rows(), seed=8) != first
    assert any(len(set(record["completions"])) > 1 for record in first)  # samples, not copies


def test_resume_after_a_kill_skips_done_prompts_and_equals_an_uninterrupted_run(model, tokenizer, tmp_path,
                                                                               monkeypatch):
    data, path = rows(8), tmp_path / "samples.jsonl"
    full = run(model, tokenizer, data, batch_size=6, out_path=path, seed=3)  # 2 prompts a batch
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 8
    # Killed after two batches, while writing the third one's first record.
    path.write_text("".join(lines[:4]) + lines[4][:25])
    assert [r["id"] for r in read_samples(path)] == [json.loads(line)["id"] for line in lines[:4]]

    calls = count_generated(monkeypatch, model)
    resumed = run(model, tokenizer, data, batch_size=6, out_path=path, seed=3)
    assert sum(calls) == 4 * 3  # only the 4 prompts not done, 3 samples each
    assert resumed == full
    ids = [record["id"] for record in read_samples(path)]
    assert sorted(ids) == sorted(row["id"] for row in data)  # each id exactly once
    assert path.read_text().endswith("\n")

    calls.clear()
    assert run(model, tokenizer, data, batch_size=6, out_path=path, seed=3) == full
    assert calls == []  # all done: nothing generated


def test_resume_rejects_a_file_of_another_rollout(model, tokenizer, tmp_path):
    path = tmp_path / "samples.jsonl"
    run(model, tokenizer, rows(2), out_path=path)
    with pytest.raises(ValueError, match="num_samples=2"):
        run(model, tokenizer, rows(2), out_path=path, num_samples=2)
    with pytest.raises(ValueError, match="'q1', which is not in rows"):
        run(model, tokenizer, rows(1), out_path=path)


@pytest.mark.parametrize("change, message", [
    (dict(num_samples=0), "num_samples=0"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_p=0.0), r"top_p=0.0; it must be in \(0, 1\]"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(backend="sglang"), "backend='sglang'; valid: transformers, vllm"),
    (dict(data=[{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]), "duplicate id 'a'"),
    (dict(data=[{"prompt": "x"}]), r"rows\[0\] has no 'id'"),
    (dict(data=[{"id": "a"}]), "has no 'prompt'"),
    (dict(data=[{"id": 1, "prompt": "x"}]), "id=1"),
    (dict(tokenizer=None), "needs its tokenizer"),
    (dict(workers=0), "workers=0"),
    (dict(workers=2), "workers=2 needs `model` as a checkpoint path"),
])
def test_bad_arguments_are_named(model, tokenizer, change, message):
    kwargs = {"tokenizer": tokenizer, "data": rows(2), **change}
    with pytest.raises(ValueError, match=message):
        run(model, kwargs.pop("tokenizer"), kwargs.pop("data"), **kwargs)


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\]"):
        rollout(rows(1), model="some/model", num_samples=2, max_new_tokens=4, backend="vllm")


def test_generates_with_kv_cache_from_a_trainer_checkpoint(monkeypatch, tmp_path, model, tokenizer):
    """A Trainer saves config.use_cache=False; without an explicit use_cache=True, generate would feed
    the whole sequence at every step instead of one new token."""
    monkeypatch.setattr(model.config, "use_cache", False)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = policy.load_pretrained(str(tmp_path), "float32")
    widths, real = [], loaded.forward
    monkeypatch.setattr(loaded, "forward", lambda *a, **kw: widths.append(kw["input_ids"].shape[1]) or real(*a, **kw))
    run(loaded, tokenizer, rows(2), max_new_tokens=5, batch_size=6)
    assert len(widths) >= 2 and set(widths[1:]) == {1}, widths


def save_policy(path, tokenizer, seed: int) -> str:
    policy.build_from_preset("tiny", SMALL, tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_worker_processes_give_the_samples_one_process_gives(tokenizer, tmp_path, monkeypatch):
    """Two one-thread worker processes share the batches out: the same records, and the same file in the
    same order, as one process with one thread. One set of workers serves checkpoint after checkpoint,
    and loads a checkpoint again once its files change."""
    data = rows(9)
    options = dict(num_samples=3, max_new_tokens=6, batch_size=6, seed=5)  # 2 prompts a batch: 5 batches
    first, second = save_policy(tmp_path / "a", tokenizer, 0), save_policy(tmp_path / "b", tokenizer, 1)
    rewritten = save_policy(tmp_path / "c", tokenizer, 0)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "get_num_threads", lambda: 2)
        workers = Workers(2)
    with workers:
        assert workers.threads == 1
        pooled = [rollout(data, model=path, workers=workers, out_path=tmp_path / f"pooled{i}.jsonl", **options)
                  for i, path in enumerate((first, second, rewritten))]
        save_policy(rewritten, tokenizer, 2)
        pooled.append(rollout(data, model=rewritten, workers=workers, **options))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [rollout(data, model=path, out_path=tmp_path / f"alone{i}.jsonl", **options)
                 for i, path in enumerate((first, second))]
        alone.append(rollout(data, model=rewritten, **options))
    finally:
        torch.set_num_threads(threads)
    assert pooled[:2] == alone[:2] and pooled[2] == pooled[0]
    assert pooled[3] == alone[2] and pooled[3] != pooled[0]  # the rewritten checkpoint was loaded again
    assert pooled[0] != pooled[1]
    for i in range(2):
        assert (tmp_path / f"pooled{i}.jsonl").read_text() == (tmp_path / f"alone{i}.jsonl").read_text()


def test_a_worker_error_reaches_the_caller(tmp_path):
    with pytest.raises(OSError, match="missing"):
        rollout(rows(4), model=str(tmp_path / "missing"), num_samples=2, max_new_tokens=4, batch_size=4, workers=2)


def test_a_single_batch_is_generated_without_starting_workers(tokenizer, tmp_path, monkeypatch):
    path = save_policy(tmp_path / "p", tokenizer, 0)
    workers = Workers(2)
    monkeypatch.setattr(workers, "engine", lambda *args: pytest.fail("workers started for a single batch"))
    with workers:
        out = rollout(rows(3), model=path, num_samples=2, max_new_tokens=4, batch_size=6, workers=workers)
    assert [record["id"] for record in out] == ["q0", "q1", "q2"]
    assert not workers.executor._processes  # none was ever started
