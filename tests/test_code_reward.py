"""The code reward on the synthetic coding tasks (data/coding.py), and a few real GRPO steps of the
pipeline with it."""

import json

import pytest

from conftest import FAST_GRPO, FAST_SFT
from data.coding import CODING_KINDS, build_coding
from rewards.code import code_reward, extract_code
from rewards.registry import resolve
from test_stages import pipeline


@pytest.fixture(scope="module")
def tasks():
    return build_coding(num_train=len(CODING_KINDS) * 6, num_heldout=4, seed=0)["train"]


def columns(rows):
    return {key: rows[key] for key in ("format", "tests", "entry_point", "test_code")}


def test_every_kind_has_distinct_prompts_and_a_passing_reference(tasks):
    assert set(tasks["kind"]) == set(CODING_KINDS) and len(set(tasks["prompt"])) == len(tasks)
    assert code_reward(tasks["prompt"], tasks["solution"], **columns(tasks)) == [1.0] * len(tasks)
    assert build_coding(5, 2, seed=3)["train"]["prompt"] == build_coding(5, 2, seed=3)["train"]["prompt"]


def test_wrong_missing_and_not_applicable(tasks):
    wrong = [s.replace("return", "return 1 +").replace("print(", "print(1, ") for s in tasks["solution"]]
    assert code_reward(tasks["prompt"], wrong, **columns(tasks)) == [0.0] * len(tasks)
    prose = ["<think>no code</think><answer>42</answer>"] * len(tasks)
    assert code_reward(tasks["prompt"], prose, **columns(tasks)) == [0.0] * len(tasks)
    mixed = {**columns(tasks), "format": [""] + tasks["format"][1:]}
    assert code_reward(tasks["prompt"], tasks["solution"], **mixed)[0] is None, "a math row in a mixed dataset"
    with pytest.raises(ValueError, match="format"):
        code_reward(tasks["prompt"], tasks["solution"])


def test_fraction_scoring_and_chat_completions():
    row = {"format": ["function_call"], "entry_point": ["f"], "test_code": [""],
           "tests": [json.dumps([{"input": [1], "output": 1}, {"input": [2], "output": 3}])]}
    half = "<think>x</think><answer>```python\ndef f(x):\n    return 1\n```</answer>"
    assert code_reward(["p"], [half], **row) == [0.0]
    assert code_reward(["p"], [half], scoring="fraction", **row) == [0.5]
    chat = [[{"role": "assistant", "content": "```py\ndef f(x):\n    return 2 * x - 1\n```"}]]
    assert code_reward(["p"], chat, **row) == [1.0]
    assert extract_code("```python\na = 1\n```\ntext\n```python\nb = 2\n```") == "b = 2\n"


def test_a_helper_in_the_prompt_is_run_before_the_completion_as_in_evaluation():
    """HumanEval-style rows: the prompt's helper (code_prefix) is not repeated by a good completion."""
    prefix = "def shift(c):\n    return chr(ord(c) + 1)\n\n\ndef encode(s):\n    \"\"\"Shift each letter.\"\"\"\n"
    row = {"format": ["assert"], "tests": ["[]"], "entry_point": ["encode"], "code_prefix": [prefix],
           "test_code": ["def check(candidate):\n    assert candidate('ab') == 'bc'\n"]}
    good = "```python\ndef encode(s):\n    return ''.join(shift(c) for c in s)\n```"
    wrong = "```python\ndef encode(s):\n    return s\n```"
    assert code_reward(["q"], [good], **row) == [1.0]
    assert code_reward(["q"], [wrong], **row) == [0.0]


def test_registered_with_recipe_args():
    reward, = resolve([{"name": "code", "weight": 1.0, "args": {"scoring": "fraction", "timeout_s": 5}}])
    assert reward.name == "code" and reward.columns == ("format",)
    with pytest.raises(ValueError, match="scoring"):
        reward.fn(["p"], ["x"], format=["stdio"], tests=["[]"], scoring="partial")


@pytest.mark.slow
def test_grpo_steps_with_the_code_reward(tmp_path):
    """The real pipeline with the embedded default's coding flag (data.source=coding): a tiny policy
    SFT-trained on synthetic coding tasks, then GRPO steps whose reward is the code reward
    (sandboxed grading of every completion)."""
    runs = tmp_path / "runs"
    args = ["data.source=coding", "data.kinds=null", "data.addends=null", "data.max_operand=null",
            "data.shortcut_fraction=null", "data.slip_fraction=null",
            "data.num_train=90", "data.num_heldout=8",
            *FAST_SFT, *FAST_GRPO, "sft.max_steps=2", "grpo.max_steps=2", "grpo.logging_steps=1",
            "grpo.rewards=[{name: code, weight: 1.0}, {name: format, weight: 0.2}]"]
    for stage in ("sft", "grpo"):
        code, out = pipeline(runs, "code", stage, *args)
        assert code == 0, out
    logged = [json.loads(line) for line in (runs / "code" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    code_means = [row["rewards/code/mean"] for row in logged if "rewards/code/mean" in row]
    assert code_means and all(0.0 <= m <= 1.0 for m in code_means)
    assert (runs / "code" / "grpo" / "manifest.json").exists()
