"""General chat tasks and preference pairs (data/chat.py): deterministic, right answers, disjoint
splits, and pairs whose rejected side is really worse in the part its reward judges."""

import re

import pytest

from data.chat import HARMFUL_ACTS, REFUSAL, build_chat, build_preferences
from data.synthetic import is_heldout
from data.template import R1_SYSTEM_PROMPT, render_completion
from rewards.math import verify
from rewards.text import extract_answer

CHAT_COLUMNS = ["prompt", "completion", "answer", "kind", "domain", "harmful", "solution", "reasoning"]


def expected_answer(question: str) -> str:
    """The right answer, worked out from the question's wording independently of data/chat.py."""
    if m := re.fullmatch(r"(?:Repeat the word|Write) '([a-z]+)' (\d+) times\.", question):
        return " ".join([m[1]] * int(m[2]))
    if m := re.fullmatch(r"Reverse the word '([a-z]+)'\.|Spell '([a-z]+)' backwards\.", question):
        return (m[1] or m[2])[::-1]
    if m := re.fullmatch(r"Write '([a-z]+)' in capital letters\.|Uppercase the word '([a-z]+)'\.", question):
        return (m[1] or m[2]).upper()
    if m := re.fullmatch(r"Which letter comes after '([a-y])' in the alphabet\?|Name the letter after '([a-y])'\.",
                         question):
        return chr(ord(m[1] or m[2]) + 1)
    assert any(act in question for act in HARMFUL_ACTS), f"unrecognised question {question!r}"
    return REFUSAL


def question_of(prompt: str) -> str:
    return re.fullmatch(r".*\nUser: (.*)\nAssistant:", prompt, re.DOTALL)[1]


@pytest.fixture(scope="module")
def chat():
    return {split: build_chat(600, seed=3, split=split) for split in ("train", "heldout")}


@pytest.fixture(scope="module")
def pairs():
    return {split: build_preferences(600, seed=3, split=split) for split in ("train", "heldout")}


def test_chat_is_deterministic_by_seed(chat):
    assert build_chat(600, seed=3).to_dict() == chat["train"].to_dict()
    assert build_chat(600, seed=4)["prompt"] != chat["train"]["prompt"]


def test_chat_columns_and_answers(chat):
    for split, rows in chat.items():
        assert rows.column_names == CHAT_COLUMNS and len(rows) == 600
        for row in rows:
            assert row["answer"] == expected_answer(row["prompt"]), row
            assert row["completion"] == render_completion("", row["answer"])
            assert row["domain"] == "general" and row["solution"] == "" and row["reasoning"] == ""
            assert row["harmful"] == (row["kind"] == "harmful") == (row["answer"] == REFUSAL)
            assert is_heldout(row["prompt"]) == (split == "heldout")
        assert {"repeat", "reverse", "uppercase", "next_letter", "harmful"} == set(rows["kind"])


def test_chat_rows_are_skipped_by_the_maths_checker(chat):
    assert {verify(row["solution"], row["completion"]) for row in chat["train"].select(range(20))} == {None}


def test_harmful_share_in_both_splits(chat):
    for rows in chat.values():
        assert 0.15 <= sum(rows["harmful"]) / len(rows) <= 0.25


def test_train_and_heldout_prompts_are_disjoint(chat, pairs):
    assert not set(chat["train"]["prompt"]) & set(chat["heldout"]["prompt"])
    train_questions = {question_of(p) for p in pairs["train"]["prompt"]}
    heldout_questions = {question_of(p) for p in pairs["heldout"]["prompt"]}
    assert heldout_questions and not train_questions & heldout_questions
    assert not heldout_questions & set(chat["train"]["prompt"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split = 'test'"):
        build_chat(3, seed=0, split="test")
    with pytest.raises(ValueError, match="num = -1"):
        build_preferences(-1, seed=0)


def test_preferences_are_deterministic_and_rendered(pairs):
    assert build_preferences(600, seed=3).to_dict() == pairs["train"].to_dict()
    rows = pairs["train"]
    assert rows.column_names == ["prompt", "chosen", "rejected", "aspect", "kind", "flaw"]
    assert all(p.startswith(R1_SYSTEM_PROMPT) and p.endswith("\nAssistant:") for p in rows["prompt"])
    assert 0.4 <= rows["aspect"].count("helpful") / len(rows) <= 0.6
    other_system = build_preferences(5, seed=3, system_prompt="Be brief.")["prompt"]
    assert all(p.startswith("Be brief.\nUser: ") for p in other_system)


def test_chosen_is_the_right_answer(pairs):
    for row in list(pairs["train"]) + list(pairs["heldout"]):
        assert extract_answer(row["chosen"]) == expected_answer(question_of(row["prompt"])), row


def test_helpful_pairs_differ_in_the_answer(pairs):
    """Helpfulness sees only the text after </think>: that is where a helpful pair must differ."""
    helpful = [row for row in pairs["train"] if row["aspect"] == "helpful"]
    flaws = {row["flaw"] for row in helpful}
    assert {"wrong_count", "wrong_word", "unchanged", "wrong_letter", "compliance", "truncated", "untagged",
            "empty", "refusal"} <= flaws
    assert all(row["kind"] != "harmful" for row in helpful if row["flaw"] == "refusal"), "over-refusal is a flaw"
    for row in helpful:
        assert row["chosen"].rpartition("</think>")[2] != row["rejected"].rpartition("</think>")[2], row
        if row["flaw"] in ("truncated", "untagged"):
            assert extract_answer(row["rejected"]) is None


def test_harmless_pairs_include_unsafe_reasoning_with_the_same_answer(pairs):
    harmless = [row for row in pairs["train"] if row["aspect"] == "harmless"]
    assert {row["flaw"] for row in harmless} == {"compliance", "unsafe_reasoning"}
    for row in harmless:
        if row["flaw"] == "compliance":
            assert row["kind"] == "harmful" and extract_answer(row["rejected"]) != REFUSAL
        else:
            # Only the reasoning differs, so only a judge of the whole response can prefer one.
            assert row["chosen"].rpartition("</think>")[2] == row["rejected"].rpartition("</think>")[2]
            assert row["chosen"] != row["rejected"]
