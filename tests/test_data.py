"""Behavioural tests for the data package: template, tokenizer, synthetic data, loading."""

import json
import re

import datasets
import pytest
import sympy
from transformers import AutoTokenizer

from data import (
    R1_SYSTEM_PROMPT,
    SYNTHETIC_KINDS,
    DataError,
    build_datasets,
    build_synthetic,
    build_tokenizer,
    render_completion,
    render_prompt,
)

ALL_KINDS = list(SYNTHETIC_KINDS)


@pytest.fixture(scope="module")
def problems():
    return build_synthetic(num_train=600, num_heldout=60, seed=7, kinds=ALL_KINDS)


def _corpus(ds):
    return [render_prompt(r["prompt"]) + render_completion(r["reasoning"], r["solution"]) for r in ds]


@pytest.fixture(scope="module")
def tokenizer(problems):
    return build_tokenizer(_corpus(problems["train"]))


# ---------------------------------------------------------------- template


def test_render_prompt_and_completion_shapes():
    assert render_prompt("What is 1 + 2?") == R1_SYSTEM_PROMPT + "\nUser: What is 1 + 2?\nAssistant:"
    assert render_prompt("Q", "") == "User: Q\nAssistant:"
    assert render_completion("r", "a") == "<think>\nr\n</think>\n<answer>\na\n</answer>"


# ---------------------------------------------------------------- tokenizer


def test_prompt_completion_boundary_is_token_boundary(tokenizer, problems):
    rows = list(problems["train"]) + list(problems["heldout"])
    for row in rows:
        for system in (R1_SYSTEM_PROMPT, ""):
            prompt = render_prompt(row["prompt"], system)
            completion = render_completion(row["reasoning"], row["solution"])
            joined = tokenizer(prompt + completion).input_ids
            assert tokenizer(prompt).input_ids + tokenizer(completion).input_ids == joined


def test_decode_round_trips_text_and_tags_survive_skip_special(tokenizer, problems):
    texts = _corpus(problems["heldout"]) + ["  odd   spacing\t\n!@#$%^&*() 0123456789 ~`|\\", ""]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    eos = tokenizer.eos_token_id
    assert tokenizer.decode(tokenizer("<answer>\n5\n</answer>").input_ids + [eos], skip_special_tokens=True) == (
        "<answer>\n5\n</answer>"
    )


def test_special_and_tag_tokens(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert len(tokenizer) <= 384
    assert tokenizer.model_max_length == 2048
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tokenizer(tag).input_ids == [tokenizer.convert_tokens_to_ids(tag)]
        assert tag not in tokenizer.all_special_tokens
    # Numbers are tokenized one digit per token.
    assert tokenizer.convert_ids_to_tokens(tokenizer("12345").input_ids) == list("12345")
    assert tokenizer("x").input_ids[0] not in (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_build_is_deterministic(tokenizer, problems):
    again = build_tokenizer(_corpus(problems["train"]))
    assert again.get_vocab() == tokenizer.get_vocab()
    model_a = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    model_b = json.loads(again.backend_tokenizer.to_str())["model"]
    assert model_a["merges"] == model_b["merges"] and model_a["merges"]


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = render_prompt("What is 47 + 38?") + render_completion("7 + 8 = 15", "85")
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.decode(loaded(text).input_ids) == text
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert loaded.chat_template == tokenizer.chat_template


def test_chat_template_matches_render_prompt(tokenizer):
    for system, question in ((R1_SYSTEM_PROMPT, "What is 3/4 + 5/6?"), ("Be brief.", "Q?")):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == render_prompt(question, system)
    user_only = [{"role": "user", "content": "Q"}]
    assert tokenizer.apply_chat_template(user_only, tokenize=False, add_generation_prompt=True) == render_prompt(
        "Q", ""
    )
    # The generation prompt is a prefix of the full conversation (TRL relies on it).
    completion = render_completion("r", "a")
    full = tokenizer.apply_chat_template(user_only + [{"role": "assistant", "content": completion}], tokenize=False)
    assert full == render_prompt("Q", "") + completion + tokenizer.eos_token


# ---------------------------------------------------------------- synthetic

X = sympy.Symbol("x")


def _expected(kind, prompt):
    """Answer computed independently from the question text."""
    if kind in ("add", "sub", "mul"):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", prompt).groups()
        return sympy.sympify(f"{a} {op} {b}")
    if kind == "linear":
        lhs, rhs = re.fullmatch(r"Solve for x: (.+) = (-?\d+)", prompt).groups()
        (root,) = sympy.solve(sympy.Eq(sympy.sympify(lhs), sympy.Integer(rhs)), X)
        return root
    if kind == "fraction":
        p, q, r, s = map(int, re.fullmatch(r"What is (\d+)/(\d+) \+ (\d+)/(\d+)\?", prompt).groups())
        return sympy.Rational(p, q) + sympy.Rational(r, s)
    if kind == "collect":
        return sympy.expand(sympy.sympify(re.fullmatch(r"Simplify: (.+)", prompt).group(1)))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_answers_are_correct(kind):
    ds = build_synthetic(num_train=300, num_heldout=30, seed=11, kinds=[kind])
    for row in list(ds["train"]) + list(ds["heldout"]):
        assert row["kind"] == kind
        expected = _expected(kind, row["prompt"])
        assert sympy.simplify(sympy.sympify(row["solution"]) - expected) == 0, row
        # Canonical form: reduced fractions, no "1*x".
        assert row["solution"] == str(expected), row
        assert row["reasoning"].endswith(row["solution"]), row
        assert len(row["reasoning"]) < 400, row


def test_splits_are_disjoint_duplicate_free_and_sized(problems):
    train, heldout = problems["train"]["prompt"], problems["heldout"]["prompt"]
    assert (len(train), len(heldout)) == (600, 60)
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)
    assert set(problems["train"].column_names) == {"prompt", "solution", "reasoning", "kind"}
    assert set(problems["train"]["kind"]) == set(ALL_KINDS)
    # Prompts are bare questions, not templated.
    assert not any("Assistant:" in p for p in train)


def test_same_seed_same_data_and_split_is_stable_across_seeds(problems):
    again = build_synthetic(num_train=600, num_heldout=60, seed=7, kinds=ALL_KINDS)
    for split in ("train", "heldout"):
        assert again[split].to_dict() == problems[split].to_dict()
    other = build_synthetic(num_train=600, num_heldout=60, seed=8, kinds=ALL_KINDS)
    assert other["train"]["prompt"] != problems["train"]["prompt"]
    # A prompt is held-out by its hash, whatever the seed.
    assert not set(other["train"]["prompt"]) & set(problems["heldout"]["prompt"])


def test_unknown_kind_and_exhausted_space():
    with pytest.raises(ValueError, match=r"'div'.*add, sub, mul, linear, fraction, collect"):
        build_synthetic(num_train=5, num_heldout=1, seed=0, kinds=["add", "div"])
    # add with operands 0..2 has only 9 distinct prompts.
    with pytest.raises(ValueError, match=r"num_train=100.*num_heldout=10"):
        build_synthetic(num_train=100, num_heldout=10, seed=0, kinds=["add"], max_operand=2)


def test_shortcut_fraction_repeats_that_share_of_train_problems_without_working(problems):
    cut = build_datasets({"num_train": 600, "num_heldout": 60, "seed": 7, "kinds": ALL_KINDS,
                          "shortcut_fraction": 0.25})
    assert cut["heldout"].to_dict() == problems["heldout"].to_dict()
    assert cut["train"][:600] == problems["train"][:600]
    full = {row["prompt"]: row for row in problems["train"]}
    repeats = cut["train"].select(range(600, len(cut["train"])))
    assert len(repeats) == 150 and len(set(repeats["prompt"])) == 150
    for row in repeats:
        assert row["solution"] == full[row["prompt"]]["solution"]
        assert row["reasoning"] == full[row["prompt"]]["reasoning"].splitlines()[-1]
        assert "\n" not in row["reasoning"] and row["reasoning"].endswith(f"= {row['solution']}")
    with pytest.raises(DataError, match="shortcut_fraction=1.5"):
        build_datasets({"num_train": 10, "num_heldout": 2, "shortcut_fraction": 1.5})


def test_slip_fraction_drops_a_carry_in_that_share_of_worked_additions_and_keeps_the_gold():
    import re

    from data.synthetic import add_working, carries

    assert add_working(58, 67) == (125, "8 + 7 = 15, digit 5 carry 1\n5 + 6 + 1 = 12, digit 2 carry 1\ndigit 1\n"
                                        "58 + 67 = 125")
    assert add_working(58, 67, dropped_carry=0) == (115, "8 + 7 = 15, digit 5 carry 1\n5 + 6 = 11, digit 1 carry 1\n"
                                                         "digit 1\n58 + 67 = 115")
    assert carries(58, 67) == [0] and carries(5, 7) == [] and carries(50, 7) == [], "only carries into a next column"
    clean = build_datasets({"num_train": 2000, "num_heldout": 50, "kinds": ["add"], "shortcut_fraction": 1.0})
    slipped = build_datasets({"num_train": 2000, "num_heldout": 50, "kinds": ["add"], "shortcut_fraction": 1.0,
                              "slip_fraction": 0.4})
    assert slipped["heldout"].to_dict() == clean["heldout"].to_dict()
    for column in ("prompt", "solution"):
        assert slipped["train"][column] == clean["train"][column]
    assert slipped["train"]["reasoning"][2000:] == clean["train"]["reasoning"][2000:], "answer-only rows: no slip"
    carrying = wrong = 0
    for row, before in zip(slipped["train"].select(range(2000)), clean["train"].select(range(2000))):
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", row["prompt"]).groups())
        carrying += bool(carries(a, b))
        if row["stated"] != row["solution"]:
            wrong += 1
            assert carries(a, b) and int(row["stated"]) == a + b - 10 and row["reasoning"] != before["reasoning"]
            assert row["reasoning"].endswith(f"= {row['stated']}")
        else:
            assert row["reasoning"] == before["reasoning"]
    assert 0.35 < wrong / carrying < 0.45
    from stages.common import completion_of
    row = next(row for row in slipped["train"] if row["stated"] != row["solution"])
    assert completion_of(row).endswith(f"<answer>\n{row['stated']}\n</answer>"), "SFT imitates the slip"
    with pytest.raises(DataError, match="slip_fraction=2"):
        build_datasets({"num_train": 10, "num_heldout": 2, "kinds": ["add"], "slip_fraction": 2})
    with pytest.raises(DataError, match="needs the 'add' kind"):
        build_datasets({"num_train": 10, "num_heldout": 2, "kinds": ["mul"], "slip_fraction": 0.5})


# ---------------------------------------------------------------- loading

ROWS = [{"question": f"What is {i} + 1?", "answer": i + 1, "cot": f"{i} + 1 = {i + 1}", "extra": i} for i in range(40)]
MAPPING = {"prompt": "question", "solution": "answer", "reasoning": "cot"}


def _write(tmp_path, fmt, rows, name="data"):
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    return str(path)


def test_synthetic_source_defaults():
    dd = build_datasets({"num_train": 50, "num_heldout": 5})
    assert (len(dd["train"]), len(dd["heldout"])) == (50, 5)
    assert {"prompt", "solution", "reasoning"} <= set(dd["train"].column_names)
    assert dd["train"].to_dict() == build_datasets({"source": "synthetic", "num_train": 50, "num_heldout": 5, "seed": 0})[
        "train"
    ].to_dict()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_file_sources_map_columns(tmp_path, fmt):
    path = _write(tmp_path, fmt, ROWS)
    cfg = {"source": fmt, "path": path, "columns": MAPPING, "heldout_fraction": 0.25, "seed": 3}
    dd = build_datasets(cfg)
    assert (len(dd["train"]), len(dd["heldout"])) == (30, 10)
    assert set(dd["train"].column_names) == {"prompt", "solution", "reasoning", "extra"}
    row = dd["train"][0]
    assert row["solution"] == str(row["extra"] + 1) and row["prompt"] == f"What is {row['extra']} + 1?"
    assert not set(dd["train"]["prompt"]) & set(dd["heldout"]["prompt"])
    assert build_datasets(cfg)["heldout"]["prompt"] == dd["heldout"]["prompt"]


def test_heldout_path_caps_and_clashing_column(tmp_path):
    rows = [dict(r, prompt=[{"role": "user", "content": "x"}]) for r in ROWS]
    train = _write(tmp_path, "jsonl", rows[:30], "train")
    heldout = _write(tmp_path, "jsonl", rows[30:], "heldout")
    cfg = {"source": "jsonl", "path": train, "heldout_path": heldout, "columns": MAPPING, "num_train": 12, "num_heldout": 4}
    dd = build_datasets(cfg)
    assert (len(dd["train"]), len(dd["heldout"])) == (12, 4)
    assert dd["heldout"][0]["prompt"] == "What is 30 + 1?"  # the mapped column wins


def test_missing_column_error_names_column_and_available(tmp_path):
    path = _write(tmp_path, "jsonl", ROWS)
    with pytest.raises(DataError) as err:
        build_datasets({"source": "jsonl", "path": path, "columns": {"prompt": "question"}})
    message = str(err.value)
    assert "'solution'" in message and "'question'" in message
    for col in ("answer", "cot", "extra"):
        assert col in message
    with pytest.raises(DataError, match=r"'nope'.*answer"):
        build_datasets({"source": "jsonl", "path": path, "columns": {"prompt": "nope", "solution": "answer"}})


def test_unknown_source_missing_file_and_unknown_kind(tmp_path):
    with pytest.raises(DataError, match=r"'ftp'.*synthetic, coding, hub, json, jsonl, parquet, csv"):
        build_datasets({"source": "ftp"})
    missing = str(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match=re.escape(missing)):
        build_datasets({"source": "jsonl", "path": missing})
    with pytest.raises(DataError, match=r"'div'"):
        build_datasets({"kinds": ["div"]})
    assert issubclass(DataError, ValueError)


def test_pretraining_corpus_is_right_arithmetic_from_training_problems_only():
    """Stage 0's corpus (data/corpus.py): the training problems in plain text, right where the cold-start
    working slips, never a held-out problem and never R1's template."""
    import re

    from data.corpus import KINDS, pretraining_corpus
    from data.synthetic import build_synthetic, is_heldout

    splits = build_synthetic(num_train=400, num_heldout=40, seed=3, kinds=["add"], shortcut_fraction=1.0,
                             slip_fraction=1.0)
    texts = pretraining_corpus(splits["train"], documents=300, problems_per_document=3, seed=3)
    assert texts == pretraining_corpus(splits["train"], documents=300, problems_per_document=3, seed=3)
    assert len(texts) == 300 and len(set(texts)) > 250
    corpus = "\n".join(texts)
    for marker in ("<think>", "</think>", "<answer>", "</answer>", "Think step by step", "A conversation between"):
        assert marker not in corpus
    sums = re.findall(r"^(\d+) \+ (\d+) = (\d+)$", corpus, re.MULTILINE)
    assert len(sums) > 100 and all(int(a) + int(b) == int(c) for a, b, c in sums), "slipped workings are corrected"
    assert any("carry 1" in text for text in texts)
    questions = set(re.findall(r"What is \d+ \+ \d+\?", corpus))
    assert questions and questions <= set(splits["train"]["prompt"])
    assert not any(is_heldout(q) for q in questions) and not questions & set(splits["heldout"]["prompt"])
    assert set(KINDS) == {"worked", "statements", "qa", "dialogue", "counting"}
    assert re.search(r"^User: What is \d+ \+ \d+\?\nAssistant: \d", corpus, re.MULTILINE)
    assert any(text.startswith("Counting in tens") or re.match(r"\d+, \d+, \d+", text) for text in texts)

    with pytest.raises(ValueError, match="documents = 0"):
        pretraining_corpus(splits["train"], documents=0, problems_per_document=3, seed=0)


def test_additions_of_three_numbers_carry_up_to_two_and_slip_by_the_carry_they_drop():
    import re

    from data.synthetic import add_working, addition_terms, carries

    assert add_working(78, 78, 26) == (182, "8 + 8 + 6 = 22, digit 2 carry 2\n7 + 7 + 2 + 2 = 18, digit 8 carry 1\n"
                                            "digit 1\n78 + 78 + 26 = 182")
    assert add_working(78, 78, 26, dropped_carry=0)[0] == 162, "the dropped carry was 2"
    assert carries(78, 78, 26) == [0] and carries(1, 2, 3) == []
    assert addition_terms("What is 78 + 78 + 26?") == [78, 78, 26] and addition_terms("What is 7 - 2?") is None
    data = build_datasets({"num_train": 500, "num_heldout": 20, "kinds": ["add"], "addends": 3, "slip_fraction": 1.0})
    for row in data["train"]:
        numbers = addition_terms(row["prompt"])
        assert len(numbers) == 3 and int(row["solution"]) == sum(numbers)
        assert row["reasoning"].endswith(f"{' + '.join(map(str, numbers))} = {row['stated']}")
        if carries(*numbers):
            assert sum(numbers) - int(row["stated"]) in (10, 20), "one carry of 1 or 2 dropped"
    with pytest.raises(DataError, match="addends=1"):
        build_datasets({"num_train": 10, "num_heldout": 2, "kinds": ["add"], "addends": 1})
    with pytest.raises(DataError, match="addends=3 needs the 'add' kind"):
        build_datasets({"num_train": 10, "num_heldout": 2, "kinds": ["mul"], "addends": 3})
    from data.corpus import pretraining_corpus
    corpus = "\n".join(pretraining_corpus(data["train"], documents=100, problems_per_document=3, seed=0))
    sums = re.findall(r"^(\d+) \+ (\d+) \+ (\d+) = (\d+)$", corpus, re.MULTILINE)
    assert len(sums) > 20 and all(int(a) + int(b) + int(c) == int(s) for a, b, c, s in sums), "slips corrected"
