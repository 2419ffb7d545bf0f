"""Stage 4's mixture: reasoning rows for the rule rewards, general rows for the reward models, and a
reward that does not apply to a row gives None there."""

from r1pipeline.config import apply_overrides, load_recipe
from r1pipeline.pipeline import plan
from rewards.math import accuracy_reward
from rewards.reward_model import helpfulness
from stages.align import build_dataset


def test_mixture_holds_both_domains_and_rule_rewards_skip_general_rows(tmp_path):
    recipe = apply_overrides(load_recipe("tiny"), ["data.num_train=60", "data.num_heldout=8", "data.shortcut_fraction=0",
                                                   "align.init_from=model", "align.general_ratio=0.5"])
    [stage] = plan(recipe, ["align"], tmp_path / "run")
    mixture = build_dataset(stage)
    domains = mixture["domain"]
    assert domains.count("general") == 60 and domains.count("math") == 60
    assert all(prompt.endswith("Assistant:") for prompt in mixture["prompt"])
    from data.chat import CHAT_KINDS
    assert {kind for kind, domain in zip(mixture["kind"], domains) if domain == "general"} <= set(CHAT_KINDS), \
        "general rows keep their kind: the reward models log their scores per kind"

    rows = mixture.select(range(20))
    completions = ["<think>\nx\n</think>\n<answer>\n42\n</answer>"] * len(rows)
    scores = accuracy_reward(rows["prompt"], completions, solution=rows["solution"])
    for domain, value in zip(rows["domain"], scores):
        assert (value is None) == (domain == "general"), (domain, value)
    # A reward model's reward never even loads its model for a batch without general rows.
    math_rows = mixture.filter(lambda row: row["domain"] == "math").select(range(4))
    assert helpfulness(math_rows["prompt"], completions[:4], path="no/such/model",
                       domain=math_rows["domain"]) == [None] * 4


def test_the_mixture_spreads_each_kind_of_prompt_evenly_over_training(tmp_path):
    """Stage 4 trains its mixture in order (TRL's shuffling off): every stretch of it holds reasoning and
    each general kind in their shares, give or take a row or two, so each quarter of training sees the same mix."""
    from collections import Counter

    from stages.align import spread_evenly

    recipe = apply_overrides(load_recipe("tiny"), ["data.num_train=200", "data.num_heldout=8", "data.shortcut_fraction=0",
                                                   "align.init_from=model", "align.general_ratio=0.5"])
    [stage] = plan(recipe, ["align"], tmp_path / "run")
    mixture = build_dataset(stage)
    labels = [domain if domain != "general" else kind for domain, kind in zip(mixture["domain"], mixture["kind"])]
    totals = Counter(labels)
    assert totals["math"] == 200 and sum(totals.values()) == 400
    for start in range(0, 400, 16):  # a step's 16 prompts: 8 reasoning, give or take one
        assert abs(labels[start:start + 16].count("math") - 8) <= 1, start
    for quarter in range(4):
        counts = Counter(labels[quarter * 100:(quarter + 1) * 100])
        assert all(abs(counts[label] - total / 4) < 2 for label, total in totals.items()), (quarter, counts)
    assert labels != sorted(labels) and build_dataset(stage)["prompt"] == mixture["prompt"], "seeded, not sorted"

    order = spread_evenly([[0, 1, 2, 3], [10, 11], [20]], seed=0)
    assert sorted(order) == [0, 1, 2, 3, 10, 11, 20]
    assert spread_evenly([[0, 1, 2, 3], [10, 11], [20]], seed=1) != order


def test_stage_4_trains_its_mixture_in_the_order_built(tmp_path, monkeypatch):
    from stages import align, grpo

    seen = {}
    monkeypatch.setattr(align, "ensure_reward_model", lambda stage: {})
    monkeypatch.setattr(align, "build_dataset", lambda stage: "mixture")
    monkeypatch.setattr(grpo, "train", lambda stage, dataset, **defaults: seen.update(defaults, dataset=dataset) or {})
    align.run(None)
    assert seen == {"dataset": "mixture", "shuffle_dataset": False}


def test_reward_trend_covers_each_reward_over_the_steps_that_logged_it(tmp_path):
    import json

    from stages.grpo import reward_trend

    rows = [{"step": step, "reward": float(step), "rewards/accuracy/mean": 1.0,
             # a reward model's reward: logged on steps whose batch held a general prompt (every other one)
             "rewards/helpfulness/mean": float(step) if step % 2 else None} for step in range(1, 17)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    trend = reward_trend(tmp_path)
    assert trend["reward_first_quarter"] == 2.5 and trend["reward_last_quarter"] == 14.5
    assert trend["rewards/accuracy/mean_first_quarter"] == trend["rewards/accuracy/mean_last_quarter"] == 1.0
    assert trend["rewards/helpfulness/mean_first_quarter"] == 2.0, "steps 1 and 3: the first quarter of its 8"
    assert trend["rewards/helpfulness/mean_last_quarter"] == 14.0
    # Logged per prompt kind too: each kind's quarters, and their mean over kinds.
    for row in rows:
        row["rewards/helpfulness/repeat/mean"] = 1.0 + row["step"] / 16
        row["rewards/helpfulness/harmful/mean"] = 3.0 if row["step"] % 2 else None
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    trend = reward_trend(tmp_path)
    assert trend["rewards/helpfulness/repeat/mean_first_quarter"] == 1.0 + 2.5 / 16
    assert trend["rewards/helpfulness/within_kinds_first_quarter"] == (1.0 + 2.5 / 16 + 3.0) / 2
    assert trend["rewards/helpfulness/within_kinds_last_quarter"] == (1.0 + 14.5 / 16 + 3.0) / 2
    assert reward_trend(tmp_path / "missing") == {}
