"""Real dataset formats end to end (issue 14, points 1 and 2). The fixtures in tests/data/real/ are rows
written by hand in each public dataset's own columns and conventions (its README names them); they
are loaded by build_datasets as a recipe's data section loads the real dataset, and graded by the
registered rewards GRPO uses, called the way TRL's GRPOTrainer calls them. The code rewards run in the
real sandbox, so those tests are few."""

import json
from pathlib import Path

import datasets
import pytest

from data import DataError, build_coding, build_datasets, render_prompt
from r1pipeline.config import ConfigError, check_sections
from rewards.registry import resolve

REAL = Path(__file__).parent / "data" / "real"


def load(name: str, **options) -> datasets.Dataset:
    """A fixture file's rows in file order: it is its own held-out file, so no row is carved out."""
    path = str(REAL / name)
    return build_datasets({"source": "jsonl", "path": path, "heldout_path": path, **options})["train"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def fixture_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (REAL / name).read_text().splitlines()]


def grpo_reward(name: str, rows: list[dict], completions: list[str]) -> list:
    """The registered reward as GRPOTrainer._calculate_rewards calls it: each row repeated for the
    completions of its group, the prompt rendered as stages/grpo.py renders it, every other dataset
    column a keyword list, and TRL's own extras (trainer_state, log_extra, log_metric)."""
    group = len(completions) // len(rows)
    inputs = [row for row in rows for _ in range(group)]
    columns = {key: [row[key] for row in inputs] for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")}
    reward, = resolve([{"name": name, "weight": 1.0}])
    return reward.fn(prompts=[render_prompt(row["prompt"]) for row in inputs], completions=completions,
                     completion_ids=None, trainer_state=None, log_extra=lambda *a, **k: None,
                     log_metric=lambda *a, **k: None, **columns)


# ---------------------------------------------------------------- math


def gsm8k() -> datasets.DatasetDict:
    """GSM8K as a hub dataset, its train and test splits, from a local directory."""
    return build_datasets({"source": "hub", "path": str(REAL / "gsm8k"), "split": "train", "heldout_split": "test",
                           "columns": {"prompt": "question", "solution": "answer"}})


def dapo_parquet(tmp_path) -> datasets.Dataset:
    """DAPO-Math as it ships, in Parquet (nested struct columns), its gold a nested field."""
    path = str(tmp_path / "dapo.parquet")
    datasets.Dataset.from_list(fixture_rows("dapo_math.jsonl")).to_parquet(path)
    return build_datasets({"source": "parquet", "path": path, "heldout_path": path,
                           "columns": {"answer": "reward_model.ground_truth", "id": "extra_info.index"}})["train"]


# dataset: (its rows, the golds reduced, one (right, wrong) completion per row)
MATH_CASES = {
    "gsm8k": (lambda tmp_path: gsm8k()["train"], ["9", "1260", "14"], [
        ("<think>\n36/4 = 9 eaten, 36 - 9 = 27 left, 27/3 = 9\n</think>\n<answer>\n9\n</answer>",
         "<think>\n36 - 9 = 27\n</think>\n<answer>\n27\n</answer>"),
        ("<think>15 * 80 = 1200, 5 * 12 = 60</think>\n<answer>$1,260</answer>", "<think>15 * 80</think><answer>1200</answer>"),
        ("12 + 24 = 36 read, so 50 - 36 = 14 are left. The answer is 14.", "The answer is 36."),
    ]),
    "competition_math": (lambda tmp_path: load("competition_math.jsonl", columns={"prompt": "problem"}),
                         ["\\frac{1}{2}", "\\text{(C)}", "-2, 3", "2, 5", "\\frac{\\sqrt{3}}{2}"], [
        ("<think>f(1) = 1/(1+1)</think>\n<answer>$\\frac{1}{2}$</answer>", "<answer>\\frac{1}{3}</answer>"),
        ("Only 29 is prime. The answer is $\\boxed{C}$.", "$\\boxed{\\text{(E)}}$"),
        ("<think>(x-3)(x+2)</think><answer>x = 3, x = -2</answer>", "<answer>-3, 2</answer>"),
        ("So $a = \\boxed{2}$ and $b = \\boxed{5}$.", "So $a = \\boxed{2}$."),
        ("$\\boxed{\\sqrt{3}/2}$", "$\\boxed{\\frac{1}{2}}$"),
    ]),
    "numina_math_cot": (lambda tmp_path: load("numina_math_cot.jsonl", columns={"prompt": "problem"}),
                        ["84", "C", "80", "2^{n}-1"], [
        ("<think>168 = 2^3*3*7, 252 = 2^2*3^2*7</think><answer>84</answer>", "<answer>42</answer>"),
        ("Hence the choice is \\boxed{C}", "Hence the choice is \\boxed{D}"),
        ("The average speed is $\\boxed{80}$ km/h.", "The average speed is $\\boxed{720}$ km/h."),
        ("$$\\boxed{2^n - 1}$$", "$$\\boxed{2^{n-1}}$$"),
    ]),
    "openr1_math": (lambda tmp_path: load("openr1_math.jsonl", columns={"prompt": "problem", "id": "uuid"}),
                    ["91", "B", "x_{1}=-3, x_{2}=2", "\\frac{1}{3}"], list(zip(
        [row["generations"][0] for row in fixture_rows("openr1_math.jsonl")],  # the dataset's own R1 traces
        ["\\boxed{90}", "\\boxed{C}", "The roots are $\\boxed{-2}$ and $\\boxed{3}$.", "\\boxed{\\frac{1}{6}}"]))),
    "dapo_math": (dapo_parquet, ["84", "19", "46"], [
        ("Heron's formula: s = 21, area = sqrt(21*8*7*6) = 84.\nAnswer: 84", "The area is half of 13 * 14.\nAnswer: 91"),
        ("The sum telescopes to 1 - 1/10 = 9/10, so m + n = 19.\nAnswer: 19", "Answer: 10"),
        ("33 + 19 - 6 = 46.\nAnswer: 46", "33 + 19 = 52.\nAnswer: 52"),
    ]),
}


@pytest.mark.parametrize("dataset", MATH_CASES)
def test_accuracy_reward_on_real_math_golds(dataset, tmp_path):
    """GRPO's accuracy reward gives 1 to a right completion and 0 to a wrong one, the gold being the
    reduced `solution` column exactly as TRL hands the row's columns to the reward."""
    make, golds, completions = MATH_CASES[dataset]
    rows = make(tmp_path)
    assert list(rows["solution"]) == golds
    flat = [completion for pair in completions for completion in pair]
    assert grpo_reward("accuracy", list(rows), flat) == [1.0, 0.0] * len(golds)


def test_gsm8k_splits_and_worked_solutions_for_sft():
    dd = gsm8k()
    assert dd["heldout"]["solution"] == ["2.5"] and dd["heldout"]["prompt"][0].startswith("Lena buys")
    row = dd["train"][1]
    assert row["worked_solution"].endswith("#### 1260") and "<<15*80=1200>>" in row["worked_solution"]
    # Cold-start SFT trains on <think>reasoning</think><answer>solution</answer>: no "####", no <<...>>.
    assert row["reasoning"] == ("The bikes bring in 15 * 80 = $1,200.\nThe helmets bring in 5 * 12 = $60.\n"
                                "In total the shop takes in 1,200 + 60 = $1260.")
    assert grpo_reward("accuracy", [dd["heldout"][0]], ["<answer>$2.50</answer>", "<answer>7.5</answer>"]) == [1.0, 0.0]


def test_answer_column_first_chat_prompts_as_text_and_raw_golds_as_written():
    rows = load("openr1_math.jsonl", columns={"prompt": "problem", "id": "uuid"})
    # "5. B.\n\nSince ..." marks no final answer: only the answer column makes the row usable.
    assert rows["solution"][1] == "B" and rows["reasoning"][1].startswith("5. B.")
    assert list(load("openr1_math.jsonl", columns={"prompt": "problem"}, answer_format="column")["solution"]) == \
        list(rows["solution"])
    dapo = load("dapo_math.jsonl", columns={"answer": "reward_model.ground_truth"})
    assert dapo["prompt"][0].startswith("Solve the following math problem step by step.")
    assert "reasoning" not in dapo.column_names  # DAPO has no worked solutions to train SFT on
    raw = load("competition_math.jsonl", columns={"prompt": "problem"}, answer_format="raw")
    assert list(raw["solution"]) == [row["solution"] for row in fixture_rows("competition_math.jsonl")]


def test_coding_tasks_in_a_file_keep_their_reference_programs(tmp_path):
    tasks = build_coding(num_train=8, num_heldout=2, seed=0)["train"]
    path = str(tmp_path / "coding.jsonl")
    tasks.to_json(path)
    rows = build_datasets({"source": "jsonl", "path": path, "heldout_path": path})["train"]
    assert list(rows["solution"]) == list(tasks["solution"]) and list(rows["reasoning"]) == list(tasks["reasoning"])


# ---------------------------------------------------------------- golds that cannot be reduced


def test_irreducible_gold_fails_at_load_naming_row_and_column(tmp_path):
    with pytest.raises(DataError) as err:
        load("numina_math_cot_proofs.jsonl", columns={"prompt": "problem"})
    message = str(err.value)
    assert message.startswith("train data: 1 of 2 rows have a gold that cannot be reduced")
    assert "row 1, column 'solution': a worked solution that marks no final answer" in message
    assert "blacksquare" in message and "row 0" not in message

    rows = fixture_rows("dapo_math.jsonl")
    rows[2]["reward_model"]["ground_truth"] = ""
    with pytest.raises(DataError, match=r"1 of 3 rows.*row 2 \(id '0f9e8d7c-6b5a-4f3e-9d2c-1b0a9f8e7d6c'\), column "
                                        r"'answer' \(dataset column 'reward_model.ground_truth'\): empty"):
        build_datasets({"source": "jsonl", "path": write_jsonl(tmp_path / "dapo.jsonl", rows),
                        "heldout_fraction": 0.5, "columns": {"answer": "reward_model.ground_truth", "id": "extra_info.index"}})

    rows = fixture_rows("openr1_math.jsonl")
    rows[3]["answer"] = "\\frac{1}{3"
    path = write_jsonl(tmp_path / "openr1.jsonl", rows)
    with pytest.raises(DataError, match=r"row 3 \(id '1f2e3d4c-.*column 'answer': its answer '\\\\frac\{1\}\{3' "
                                        r"is not one the checker can read"):
        build_datasets({"source": "jsonl", "path": path, "heldout_path": path, "columns": {"prompt": "problem", "id": "uuid"}})


def test_strict_formats_name_every_bad_row_up_to_a_few(tmp_path):
    with pytest.raises(DataError, match=r"5 of 5 rows .*answer_format='gsm8k'.*row 0, column 'solution': no '#### N' line"):
        load("competition_math.jsonl", columns={"prompt": "problem"}, answer_format="gsm8k")
    with pytest.raises(DataError, match=r"row 0, column 'solution' \(dataset column 'answer'\): no \\boxed\{\}"):
        build_datasets({"source": "hub", "path": str(REAL / "gsm8k"), "heldout_split": "test",
                        "columns": {"prompt": "question", "solution": "answer"}, "answer_format": "boxed"})
    rows = [{"question": f"q{i}", "answer": f"{i} apples\nand more"} for i in range(8)]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"8 of 8 rows.*row 4, .*; and 3 more$") as err:
        build_datasets({"source": "jsonl", "path": path, "heldout_path": path,
                        "columns": {"prompt": "question", "solution": "answer"}})
    assert "row 5" not in str(err.value)


def test_option_values_are_checked():
    path = str(REAL / "competition_math.jsonl")
    with pytest.raises(DataError, match=r"answer_format='latex' is not one of auto, raw, gsm8k, boxed, column"):
        build_datasets({"source": "jsonl", "path": path, "answer_format": "latex"})
    with pytest.raises(DataError, match=r"test_format='mbpp' is not one of kodcode, apps, humaneval"):
        build_datasets({"source": "jsonl", "path": path, "test_format": "mbpp"})
    with pytest.raises(DataError, match=r"test_format='apps'.*columns do not apply"):
        build_datasets({"source": "jsonl", "path": path, "test_format": "apps", "columns": {"prompt": "question"}})
    with pytest.raises(DataError, match=r"lacks column\(s\) \['question', 'input_output'\]"):
        build_datasets({"source": "jsonl", "path": path, "test_format": "apps"})
    with pytest.raises(DataError, match=r"missing required column 'answer'"):
        build_datasets({"source": "jsonl", "path": path, "answer_format": "column", "columns": {"prompt": "problem"}})
    with pytest.raises(ConfigError, match=r"data.answer_format = 1 .*expected str"):
        check_sections({"data": {"answer_format": 1}})


# ---------------------------------------------------------------- code


def test_invalid_rows_drop_leaves_them_out_with_a_warning(tmp_path, capsys):
    rows = load("numina_math_cot_proofs.jsonl", columns={"prompt": "problem"}, invalid_rows="drop")
    assert rows["prompt"] == [fixture_rows("numina_math_cot_proofs.jsonl")[0]["problem"]], "the proof row is left out"
    out = capsys.readouterr().out
    assert "data: dropping train data: 1 of 2 rows have a gold that cannot be reduced" in out and "row 1" in out
    good = fixture_rows("kodcode.jsonl")[0]
    pytest_row = {**good, "question_id": "Leetcode_20_I", "test": good["test"] + "\n\nimport pytest\n"}
    path = write_jsonl(tmp_path / "kodcode.jsonl", [good, pytest_row])
    kept = build_datasets({"source": "jsonl", "path": path, "heldout_path": path, "test_format": "kodcode",
                           "invalid_rows": "drop"})["train"]
    assert kept["id"] == [good["question_id"]]
    with pytest.raises(DataError, match="would leave no row"):
        load("numina_math_cot_proofs.jsonl", columns={"prompt": "problem"}, answer_format="gsm8k", invalid_rows="drop")
    with pytest.raises(DataError, match="invalid_rows='skip' is not one of error, drop"):
        load("numina_math_cot_proofs.jsonl", columns={"prompt": "problem"}, invalid_rows="skip")


def test_hub_names_load_from_the_mirror(tmp_path, monkeypatch):
    """R1PIPELINE_HUB_MIRROR: a recipe's hub dataset (and its configuration) read from a local mirror."""
    import shutil

    mirror = tmp_path / "mirror"
    shutil.copytree(REAL / "gsm8k", mirror / "datasets" / "openai" / "gsm8k" / "main")
    monkeypatch.setenv("R1PIPELINE_HUB_MIRROR", str(mirror))
    loaded = build_datasets({"source": "hub", "path": "openai/gsm8k", "name": "main", "split": "train",
                             "heldout_split": "test", "columns": {"prompt": "question", "solution": "answer"}})
    assert len(loaded["train"]) == len(fixture_rows("gsm8k/train.jsonl"))
    assert loaded["heldout"]["prompt"] == [row["question"] for row in fixture_rows("gsm8k/test.jsonl")]
    sampled = build_datasets({"source": "hub", "path": "openai/gsm8k", "name": "main", "heldout_split": "test",
                              "columns": {"prompt": "question", "solution": "answer"}}, sample=2)  # a dry run's read
    assert sampled["train"]["prompt"] == loaded["train"]["prompt"][:2]


def wrong_program(row: dict) -> str:
    body = f"def {row['entry_point']}(*args):\n    return None\n" if row["entry_point"] else "print(0)\n"
    return f"```python\n{body}```"


CODE_CASES = {"kodcode.jsonl": "kodcode", "taco.jsonl": "apps", "apps.jsonl": "apps", "humaneval.jsonl": "humaneval"}


@pytest.mark.parametrize("name", CODE_CASES)
def test_code_fixtures_map_to_sandbox_problems_graded_by_the_code_reward(name):
    """The dataset's reference solution passes and a wrong program fails, through the registered
    code reward and the real sandbox."""
    rows = list(load(name, test_format=CODE_CASES[name]))
    assert all(row["solution"].startswith("```python\n") for row in rows)
    completions = [completion for row in rows for completion in (f"<think>ok</think>\n{row['solution']}", wrong_program(row))]
    assert grpo_reward("code", rows, completions) == [1.0, 0.0] * len(rows)


def test_code_formats_by_convention():
    kodcode, apps, humaneval = load("kodcode.jsonl", test_format="kodcode"), load("apps.jsonl", test_format="apps"), \
        load("humaneval.jsonl", test_format="humaneval")
    assert kodcode["id"] == ["Leetcode_12_I", "Prefill_4301_C"] and set(kodcode["format"]) == {"assert"}
    assert kodcode["entry_point"] == ["has_pair_with_sum", "mean_of_squares"]  # `import *`: from test_info
    assert "from solution" not in kodcode["test_code"][0] and "def check(candidate):" in kodcode["test_code"][0]
    assert apps["id"] == ["4012", "2531"] and apps["format"] == ["stdio", "function_call"]
    assert json.loads(apps["tests"][0])[0] == {"input": "3\n1 2 3\n", "output": "6\n3"}  # a list of lines, joined
    assert json.loads(apps["tests"][1])[0] == {"input": ["Abba"], "output": True}  # [True]: APPS's wrapper taken off
    assert apps["prompt"][1].endswith("```python\ndef is_palindrome(s):\n```")
    taco = load("taco.jsonl", test_format="apps")
    assert "id" not in taco.column_names and taco["entry_point"] == ["", "digit_sum"]  # TACO has no id column
    assert humaneval["code_prefix"][1].count("def shift_char") == 1 and humaneval["id"][0] == "HumanEval/900"


def test_rows_the_sandbox_cannot_grade_fail_at_load(tmp_path):
    good = fixture_rows("kodcode.jsonl")[0]
    rows = [good,
            {**good, "question_id": "Leetcode_20_I", "test": good["test"] + "\n\nimport pytest\n\ndef test_raises():\n"
             "    with pytest.raises(TypeError):\n        has_pair_with_sum(None, 1)\n"},
            {**good, "question_id": "Data_structure_7_I", "solution": "class Stack:\n    pass\n",
             "test": "from solution import Stack\n\ndef test_push():\n    assert Stack() is not None\n"},
            {**good, "question_id": "Leetcode_31_I",
             "test": good["test"] + "\n\ndef test_fixture(tmp_path):\n    assert tmp_path\n"}]
    path = write_jsonl(tmp_path / "kodcode.jsonl", rows)
    with pytest.raises(DataError) as err:
        build_datasets({"source": "jsonl", "path": path, "heldout_path": path, "test_format": "kodcode"})
    message = str(err.value)
    assert message.startswith("train data: 3 of 4 rows cannot be graded as sandbox problems (data.test_format='kodcode')")
    assert "row 1 (id 'Leetcode_20_I'): its test imports 'pytest'; the sandbox has the standard library only" in message
    assert "row 2 (id 'Data_structure_7_I'): 'Stack' is a class" in message
    assert "row 3 (id 'Leetcode_31_I'): test_fixture takes pytest fixtures or parameters" in message

    apps = fixture_rows("apps.jsonl")
    rows = [{**apps[1], "starter_code": "class Solution:\n    def is_palindrome(self, s):\n        "},
            {**apps[0], "input_output": "{\"inputs\": [\"1\\n\"]"},
            {**apps[0], "input_output": json.dumps({"inputs": ["1\n", "2\n"], "outputs": ["1\n"]})}]
    path = write_jsonl(tmp_path / "apps.jsonl", rows)
    with pytest.raises(DataError) as err:
        build_datasets({"source": "jsonl", "path": path, "heldout_path": path, "test_format": "apps"})
    message = str(err.value)
    assert "row 0 (id '2531'): 'is_palindrome' is a method of LeetCode's class Solution" in message
    assert "row 1 (id '4012'): its input_output is not JSON text" in message
    assert "row 2 (id '4012'): its input_output has 2 inputs and 1 outputs" in message
