"""Language consistency, DAPO's soft overlong penalty and the n-gram repetition penalty."""

import pytest

from rewards import REGISTRY, resolve
from rewards.language import language_consistency_reward
from rewards.length import soft_overlong_reward
from rewards.repetition import repetition_reward


def test_language_consistency_counts_target_words_in_the_reasoning_only():
    completions = ["<think>We add three and four 所以</think><answer>7 答案</answer>",  # 5 English, 2 Han
                   "<think>3 + 4 = 7</think><answer>7</answer>",  # no words: not applicable
                   "plain english without tags"]
    assert language_consistency_reward(["p"] * 3, completions) == [5 / 7, None, 1.0]
    assert language_consistency_reward(["p"], ["<think>因为 3+4=7 so</think>"], language="zh") == [2 / 3]
    with pytest.raises(ValueError, match="language = 'xx'; valid"):
        language_consistency_reward(["p"], ["x"], language="xx")


def test_soft_overlong_follows_dapo_equation_13():
    ids = [[0] * n for n in (6, 7, 8, 10, 11)]
    assert soft_overlong_reward(["p"] * 5, [""] * 5, ids, max_length=10, cache=4) == [0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="needs completion_ids"):
        soft_overlong_reward(["p"], [""], max_length=10, cache=4)
    with pytest.raises(ValueError, match="cache = 20"):
        soft_overlong_reward(["p"], [""], [[0]], max_length=10, cache=20)


def test_repetition_penalises_repeated_ngrams():
    rewards = repetition_reward(["p"] * 3, ["a b c a b c a b c", "the cat sat on the mat", "too short"])
    assert rewards == pytest.approx([-4 / 7, 0.0, 0.0])
    assert repetition_reward(["p"], ["a a a a"], ngram_size=1, max_penalty=-0.5) == [pytest.approx(-0.375)]
    with pytest.raises(ValueError, match="max_penalty = 1"):
        repetition_reward(["p"], ["x"], max_penalty=1)


def test_registered_with_recipe_args():
    assert {"language_consistency", "soft_overlong", "repetition", "accuracy"} <= set(REGISTRY)
    rewards = resolve([{"name": "soft_overlong", "args": {"max_length": 4, "cache": 2}},
                       {"name": "repetition", "args": {"ngram_size": 2}},
                       {"name": "language_consistency", "args": {"language": "en"}}])
    assert rewards[0].fn(["p"], [""], [[0] * 3]) == [-0.5]
    assert [r.name for r in rewards] == ["soft_overlong", "repetition", "language_consistency"]
