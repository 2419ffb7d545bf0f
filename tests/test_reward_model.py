"""Reward models (rewards/reward_model.py): a tiny one trained with TRL's RewardTrainer on synthetic
pairs, saved and loaded back, and the helpfulness/harmlessness rewards that score with it."""

import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

import rewards.reward_model as rm
from data import build_tokenizer, render_completion
from data.chat import build_preferences

FAST = {"max_steps": 8, "per_device_train_batch_size": 16, "hidden_size": 32, "num_layers": 1}


def corpus(pairs):
    return (p + c + r for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pairs = build_preferences(256, seed=0)
    heldout = build_preferences(64, seed=0, split="heldout")
    tokenizer = build_tokenizer(corpus(pairs))
    out_dir = tmp_path_factory.mktemp("rm") / "reward_model"
    metrics = rm.train_reward_model(out_dir, pairs, tokenizer, heldout=heldout, **FAST)
    return {"dir": out_dir, "pairs": pairs, "heldout": heldout, "tokenizer": tokenizer, "metrics": metrics}


def test_trained_model_saves_loads_and_reports_accuracy_per_aspect(trained):
    out_dir, metrics = trained["dir"], trained["metrics"]
    assert json.loads((out_dir / rm.MARKER).read_text())["metrics"] == metrics
    assert not out_dir.with_name(out_dir.name + ".tmp").exists()
    assert 0 <= metrics["heldout_accuracy_helpful"] <= 1 and 0 <= metrics["heldout_accuracy_harmless"] <= 1
    # TRL drops pairs over max_length (here the longest reasoning pairs, in a 384-token vocabulary).
    assert 0.9 * len(trained["pairs"]) <= metrics["train_pairs"] <= len(trained["pairs"])
    model, tokenizer = rm.load_reward_model(str(out_dir))
    assert model.config.num_labels == 1 and not model.training
    assert tokenizer.pad_token_id == model.config.pad_token_id
    assert rm.load_reward_model(str(out_dir))[0] is model  # loaded once per process


def test_finished_model_is_reused_and_other_settings_retrain(trained, tmp_path):
    weights = trained["dir"] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = rm.train_reward_model(trained["dir"], trained["pairs"], trained["tokenizer"], heldout=trained["heldout"],
                                  **FAST)
    assert again == trained["metrics"] and weights.stat().st_mtime_ns == before

    other = tmp_path / "reward_model"
    rm.train_reward_model(other, trained["pairs"].select(range(64)), trained["tokenizer"], **{**FAST, "max_steps": 1})
    first = (other / "model.safetensors").stat().st_mtime_ns
    rm.train_reward_model(other, trained["pairs"].select(range(64)), trained["tokenizer"], **{**FAST, "max_steps": 2})
    assert (other / "model.safetensors").stat().st_mtime_ns != first
    assert json.loads((other / rm.MARKER).read_text())["settings"]["max_steps"] == 2


def test_score_reads_the_checkpoint(trained):
    texts = [trained["pairs"][0]["prompt"] + trained["pairs"][0]["chosen"], "short"]
    scores = rm.score(trained["dir"], texts)
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert rm.score(trained["dir"], texts[:1], batch_size=1) == pytest.approx(scores[:1], abs=1e-5)


def test_rewards_apply_to_general_rows_only(trained):
    row = trained["pairs"][0]
    prompts, completions = [row["prompt"]] * 3, [row["chosen"], row["rejected"], row["chosen"]]
    domain = ["general", "math", "general"]
    for reward in (rm.helpfulness, rm.harmlessness):
        values = reward(prompts, completions, path=str(trained["dir"]), domain=domain, solution=["", "4", ""])
        assert values[1] is None and isinstance(values[0], float) and values[0] == pytest.approx(values[2], abs=1e-5)
    assert rm.helpfulness(prompts, completions, path=str(trained["dir"]), domain=["code"] * 3) == [None] * 3


def test_under_trl_a_reward_model_logs_its_mean_per_prompt_kind(trained):
    """TRL hands reward functions `log_metric`; the reward models log each prompt kind's mean score, so
    stage 4's trend can be compared within kinds (stages.grpo.reward_trend)."""
    row = trained["pairs"][0]
    prompts, completions = [row["prompt"]] * 4, [row["chosen"], row["rejected"], row["chosen"], row["rejected"]]
    logged = {}
    values = rm.helpfulness(prompts, completions, path=str(trained["dir"]), domain=["general", "general", "math", "general"],
                            kind=["repeat", "harmful", "add", "harmful"], log_metric=logged.__setitem__)
    assert logged == {"rewards/helpfulness/repeat/mean": values[0],
                      "rewards/helpfulness/harmful/mean": pytest.approx((values[1] + values[3]) / 2)}
    assert "rewards/helpfulness/add/mean" not in logged, "reasoning rows are not scored, so not logged"


def test_helpfulness_ignores_reasoning_harmlessness_does_not(trained):
    prompt = trained["pairs"][0]["prompt"]
    clean = render_completion("The user asks a simple question.", "CAT")
    unsafe = render_completion("I could explain how to steal a car so the user can do it.", "CAT")
    args = {"path": str(trained["dir"]), "domain": ["general"] * 2}
    helpful = rm.helpfulness([prompt] * 2, [clean, unsafe], **args)
    harmless = rm.harmlessness([prompt] * 2, [clean, unsafe], **args)
    assert helpful[0] == pytest.approx(helpful[1], abs=1e-5)
    assert harmless[0] != pytest.approx(harmless[1], abs=1e-5)


def test_conversational_completions_score_like_text(trained):
    row = trained["pairs"][0]
    args = {"path": str(trained["dir"]), "domain": ["general"]}
    as_text = rm.harmlessness([row["prompt"]], [row["chosen"]], **args)
    as_messages = rm.harmlessness([row["prompt"]], [[{"role": "assistant", "content": row["chosen"]}]], **args)
    assert as_messages == pytest.approx(as_text, abs=1e-5)


def test_missing_or_wrong_path_is_named(trained, tmp_path):
    for path in (None, ""):
        with pytest.raises(ValueError, match="args.path"):
            rm.helpfulness(["p"], ["c"], path=path, domain=["general"])
    with pytest.raises(ValueError, match="nowhere"):
        rm.harmlessness(["p"], ["c"], path=str(tmp_path / "nowhere"), domain=["general"])
    causal = tmp_path / "causal_lm"
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=1)).save_pretrained(causal)
    with pytest.raises(ValueError, match="num_labels=2"):
        rm.load_reward_model(str(causal))
    with pytest.raises(ValueError, match="'domain'"):
        rm.helpfulness(["p"], ["c"], path=str(trained["dir"]))


def test_bad_pairs_and_stray_out_dir_are_refused(trained, tmp_path):
    with pytest.raises(ValueError, match=r"lack column\(s\) \['aspect'\]"):
        rm.train_reward_model(tmp_path / "a", trained["pairs"].remove_columns("aspect"), trained["tokenizer"], **FAST)
    stray = tmp_path / "stray"
    stray.mkdir()
    with pytest.raises(ValueError, match="no finished reward model"):
        rm.train_reward_model(stray, trained["pairs"], trained["tokenizer"], **FAST)


@pytest.mark.slow
def test_trained_model_ranks_heldout_pairs_better_than_chance(tmp_path):
    pairs = build_preferences(1000, seed=1)
    heldout = build_preferences(200, seed=1, split="heldout")
    metrics = rm.train_reward_model(tmp_path / "rm", pairs, build_tokenizer(corpus(pairs)), heldout=heldout,
                                    max_steps=60)
    assert metrics["heldout_accuracy_helpful"] > 0.6 and metrics["heldout_accuracy_harmless"] > 0.6
