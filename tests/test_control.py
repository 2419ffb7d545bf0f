"""The learning demo's control: rewards shuffled within each GRPO group (recipes/tiny-control.yaml)."""

from r1pipeline.config import load_recipe
from stages.grpo import shuffled_within_groups


def by_position(prompts, completions, completion_ids=None, **columns):
    return [float(c.split("-")[1]) for c in completions]


def test_rewards_are_permuted_within_groups_only_and_alike_for_every_reward():
    completions = [f"c-{i}" for i in range(16)]
    first = shuffled_within_groups(by_position, 4)([""] * 16, completions)
    again = shuffled_within_groups(by_position, 4)([""] * 16, completions)
    assert first == again, "the same batch is permuted the same way (every reward function, resumed runs)"
    assert first != by_position(None, completions), "the rewards moved"
    for start in range(0, 16, 4):
        assert sorted(first[start:start + 4]) == [float(i) for i in range(start, start + 4)], \
            "each group keeps its own rewards: same mean and spread, so the same GRPO work"
    assert shuffled_within_groups(by_position, 4).__name__ == "by_position", "logged under the reward's name"


def test_tiny_control_is_tiny_with_shuffled_rewards():
    tiny, control = load_recipe("tiny"), load_recipe("tiny-control")
    assert control["grpo"].pop("shuffle_rewards") is True
    assert control == tiny
