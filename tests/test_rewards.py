"""Built-in rewards, the registry, and user rewards by dotted path."""

import pytest

from rewards import REGISTRY, load_function, resolve
from rewards.answer import answers_match, exact_match_reward
from rewards.format import format_reward
from rewards.text import extract_answer

GOOD = [
    "<think>\n3 + 4 = 7\n</think>\n<answer>\n7\n</answer>",
    "<think>3 + 4 = 7</think><answer>7</answer>",
    "  <think>\nmulti\nline\n</think>\n\n<answer> 7 </answer>\n",
    "<think></think><answer>7</answer>",
]
BAD = [
    "7",
    "<answer>7</answer><think>late</think>",
    "<think>no answer</think>",
    "<think>a</think><answer>7</answer> trailing words",
    "<think>a<think>b</think><answer>7</answer>",
    "<think>a</think><answer>7</answer><answer>8</answer>",
    "preamble <think>a</think><answer>7</answer>",
]


@pytest.mark.parametrize("completion", GOOD)
def test_format_accepts_r1_layouts(completion):
    assert format_reward(["p"], [completion]) == [1.0]


@pytest.mark.parametrize("completion", BAD)
def test_format_rejects_broken_layouts(completion):
    assert format_reward(["p"], [completion]) == [0.0]


def test_format_reads_chat_completions():
    chat = [[{"role": "assistant", "content": GOOD[0]}]]
    assert format_reward(["p"], chat) == [1.0]


def test_extract_answer_takes_the_last():
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("so \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("no answer here") is None


@pytest.mark.parametrize("gold, pred, expected", [
    ("85", "85", True), ("85", " 85 ", True), ("7/12", "7/12", True), ("1/2", "0.5", True),
    ("-12", "-12.0", True), ("85", "58", False), ("6*x", "6 * x", True), ("6*x", "6*y", False),
])
def test_answers_match(gold, pred, expected):
    assert answers_match(gold, pred) is expected


def test_exact_match_scores_and_skips_rows_without_gold():
    completions = ["<think>.</think><answer>85</answer>", "<think>.</think><answer>84</answer>",
                   "no tags at all", "<think>.</think><answer>3</answer>"]
    rewards = exact_match_reward(["p"] * 4, completions, solution=["85", "85", "85", None])
    assert rewards == [1.0, 0.0, 0.0, None]


def test_exact_match_without_solution_column_says_so():
    with pytest.raises(ValueError, match="needs the dataset column 'solution'"):
        exact_match_reward(["p"], ["x"])


def test_registry_names_are_logged_names():
    resolved = resolve([{"name": "exact_match", "weight": 2}, {"name": "format"}])
    assert [(r.name, r.fn.__name__, r.weight) for r in resolved] == [("exact_match", "exact_match", 2.0),
                                                                        ("format", "format", 1.0)]
    assert resolved[0].columns == ("solution",)
    assert {"exact_match", "format"} <= set(REGISTRY)


@pytest.mark.parametrize("entries, message", [
    ([], "non-empty list"),
    ([{"name": "format", "function": "a.b:c"}], "exactly one of 'name' or 'function'"),
    ([{"name": "format", "weight": "heavy"}], "weight = 'heavy' must be a number"),
    ([{"name": "format", "scale": 2}], r"unknown keys \['scale'\]; allowed: name, function, weight, args"),
    ([{"name": "format"}, {"name": "format"}], "repeat"),
])
def test_resolve_rejects_bad_entries(entries, message):
    with pytest.raises(ValueError, match=message):
        resolve(entries)


def test_user_reward_by_dotted_path(tmp_path, monkeypatch):
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "my_rewards.py").write_text(
        "def brevity(prompts, completions, completion_ids=None, **columns):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_function("my_pkg.my_rewards:brevity")
    assert fn(["p", "p"], ["", "abc"]) == [1.0, 0.25]
    (reward,) = resolve([{"function": "my_pkg.my_rewards:brevity", "weight": 0.5}])
    assert (reward.name, reward.weight) == ("brevity", 0.5)


def test_args_bind_keyword_only_parameters(tmp_path, monkeypatch):
    (tmp_path / "scaled_rewards.py").write_text(
        "def scaled(prompts, completions, completion_ids=None, *, scale=1.0, **columns):\n"
        "    return [scale * len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (reward,) = resolve([{"function": "scaled_rewards:scaled", "args": {"scale": 2.0}}])
    assert reward.fn.__name__ == "scaled" and reward.fn(["p"], ["abc"]) == [6.0]
    with pytest.raises(ValueError, match=r"has no parameter\(s\) \['size'\]; its parameters: \['scale'\]"):
        resolve([{"function": "scaled_rewards:scaled", "args": {"size": 2}}])


def test_user_reward_import_error_is_reported(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="cannot import 'broken_rewards'.*no_such_dependency"):
        load_function("broken_rewards:fn")
