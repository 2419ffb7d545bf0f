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
