"""The math checker (rewards/math.py): labelled pairs, extraction, gold handling, the accuracy reward."""

import json
import random
from pathlib import Path

import pytest

from data.synthetic import SYNTHETIC_KINDS, generate_problem
from rewards import REGISTRY, resolve
from rewards.math import accuracy_reward, verify, verify_many
from rewards.math_extract import extract_prediction
from rewards.math_normal import normalise

PAIRS = [json.loads(line) for line in (Path(__file__).parent / "data" / "math_pairs.jsonl").read_text().splitlines()]


def test_labelled_pairs_accuracy_and_no_hostile_false_positive():
    verdicts = verify_many([(row["gold"], row["pred"]) for row in PAIRS], timeout=5.0)
    wrong = [(row["category"], row["gold"][:40], row["pred"][-60:], got)
             for row, got in zip(PAIRS, verdicts) if got is not row["equivalent"]]
    assert len(PAIRS) >= 400
    assert 1 - len(wrong) / len(PAIRS) >= 0.97, wrong
    hostile_false_positives = [w for w, row in zip(verdicts, PAIRS)
                               if row["category"] == "hostile" and w and not row["equivalent"]]
    assert hostile_false_positives == []


def test_every_category_is_labelled_both_ways():
    labels: dict[str, set] = {}
    for row in PAIRS:
        labels.setdefault(row["category"], set()).add(row["equivalent"])
    for category, seen in labels.items():
        if category != "unparsable_gold":
            assert seen == {True, False}, category


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_synthetic_solutions_verify_against_r1_completions(kind):
    rng = random.Random(0)
    for _ in range(5):
        solution = generate_problem(kind, rng)["solution"]
        right = f"<think>\nworking\n</think>\n<answer>\n{solution}\n</answer>"
        wrong = f"<think>\nworking\n</think>\n<answer>\n{solution} + 1\n</answer>"
        assert verify_many([(solution, right), (solution, wrong)]) == [True, False], solution


@pytest.mark.parametrize("gold", ["", "   ", "\\frac{1}{", "\\sqrt{", "}{", "\\boxed{", None])
def test_unparsable_gold_is_none_never_a_score(gold):
    assert verify(gold, "1") is None
    assert verify(gold, "\\frac{1}{") is None


def test_a_gold_is_the_answer_never_searched_for_a_number():
    assert verify("\\{1, 2\\}", "1") is False  # MV's README call pattern would extract 1 from the gold
    assert verify("1 \\pm \\sqrt{2}", "1") is False
    assert verify("$x \\le 3$", "3") is False
    assert verify("\\boxed{\\frac{7}{12}}", "7/12") is True


def test_extraction_policy():
    assert extract_prediction("<think>maybe \\boxed{5}</think><answer>6</answer>") == "6"  # reasoning never graded
    assert extract_prediction("\\boxed{3}, no wait: \\boxed{4}") == "4"  # the last box only
    assert extract_prediction("<answer>so \\boxed{9}</answer>") == "9"
    assert extract_prediction("So the final answer is: 12.") == "12"
    assert extract_prediction("lines\n\n  42  \n") == "42"
    assert verify("1", "\\boxed{" * 5000) is False  # unclosed boxes: linear time, no answer
    assert extract_prediction("7", extractors=("boxed",)) is None
    with pytest.raises(ValueError, match="unknown answer extractor"):
        extract_prediction("7", extractors=("first_number",))


@pytest.mark.parametrize("raw, normal", [
    ("\\$1,234.50", "1234.50"), ("30^{\\circ}", "30"), ("25\\%", "25"), ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\left( 1, 2 \\right]", "( 1, 2 ]"), ("5\\text{ cm}", "5"), ("\\text{Monday}", "Monday"), ("4\\,000", "4000"),
])
def test_normalise(raw, normal):
    assert normalise(raw) == normal


def test_accuracy_reward_scores_skips_and_is_registered():
    completions = ["<think>.</think><answer>7/12</answer>", "<think>.</think><answer>7/13</answer>",
                   "<think>.</think><answer>6x</answer>", [{"role": "assistant", "content": "\\boxed{-12}"}]]
    golds = ["\\frac{7}{12}", "7/12", "\\frac{1}{", "-12"]
    assert accuracy_reward(["p"] * 4, completions, solution=golds) == [1.0, 0.0, None, 1.0]
    assert accuracy_reward(["p"], ["6*x"], gold_column="answer", answer=["6x"]) == [1.0]
    with pytest.raises(ValueError, match="needs the dataset column 'solution'"):
        accuracy_reward(["p"], ["x"])
    assert REGISTRY["accuracy"][1] == ("solution",)
    (reward,) = resolve([{"name": "accuracy", "args": {"timeout": 2.0, "extractors": ["answer_tag"]}}])
    assert reward.fn(["p"], ["\\boxed{3} <answer>4</answer>"], solution=["4"]) == [1.0]
