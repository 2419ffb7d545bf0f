"""Every class of bad recipe fails before any work: one clear error naming the key, the value and
what is allowed, a non-zero exit, and nothing written."""

import importlib.util
import json

import pytest

from r1pipeline.cli import main
from r1pipeline.config import ConfigError, apply_overrides, coerce, load_recipe, parse_value


def run_cli(runs_dir, *args, stage="grpo"):
    return main(["--runs-dir", str(runs_dir), "--run", "bad", stage, *args])


def assert_rejected(capsys, runs_dir, args, *fragments, stage="grpo"):
    assert run_cli(runs_dir, *args, stage=stage) == 2
    err = capsys.readouterr().err
    assert "r1pipeline: error: " in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not runs_dir.exists(), "a rejected recipe must write nothing"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["sft.learning_rat=1e-4"], ["sft", "'learning_rat'", "did you mean learning_rate"]),
        (["model.presets=tiny"], ["model: unknown key 'presets'", "preset"]),
        (["data.num_trian=5"], ["data: unknown key 'num_trian'", "num_train"]),
        (["optimizer.lr=1"], ["recipe: unknown key 'optimizer'"]),
        (["model.config.hidden_sise=64"], ["model.config", "'hidden_sise'", "hidden_size"]),
        (["sft.output_dir=/tmp/x"], ["sft.output_dir is set by the run directory"]),
    ],
)
def test_unknown_keys(capsys, runs_dir, args, fragments):
    assert_rejected(capsys, runs_dir, args, *fragments, stage="sft")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["sft.max_steps=ten"], ["sft.max_steps = 'ten' (str) has the wrong type: expected int"]),
        (["sft.learning_rate=fast"], ["sft.learning_rate = 'fast'", "expected float"]),
        (["sft.bf16=3"], ["sft.bf16 = 3", "expected bool"]),
        (["model.dtype=float8"], ["model.dtype = 'float8'", "bfloat16"]),
        (["model.preset=huge"], ["model.preset = 'huge'", "tiny"]),
        (["data.num_train=many"], ["data.num_train = 'many' (str) has the wrong type: expected int"]),
        (["data.kinds=add"], ["data.kinds = 'add'", "expected list[str]"]),
    ],
)
def test_wrong_types_and_values(capsys, runs_dir, args, fragments):
    assert_rejected(capsys, runs_dir, args, *fragments, stage="sft")


def test_batch_not_divisible_by_num_generations(capsys, runs_dir):
    assert_rejected(capsys, runs_dir, ["grpo.num_generations=3", "grpo.per_device_train_batch_size=8"],
                    "not divisible by num_generations (3)", "per_device_train_batch_size (8)", "[2, 4, 8]",
                    stage="all")


def test_batch_divisibility_counts_processes(tmp_path, capsys, runs_dir):
    config = tmp_path / "acc.yaml"
    config.write_text("num_processes: 3\n")
    assert main(["--runs-dir", str(runs_dir), "--accelerate-config", str(config), "all",
                 "grpo.num_generations=16", "grpo.per_device_train_batch_size=8"]) == 2
    assert "processes (3)" in capsys.readouterr().err
    assert not runs_dir.exists()


def test_missing_dataset_columns(tmp_path, capsys, runs_dir):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(20)))
    assert_rejected(capsys, runs_dir, ["data.source=jsonl", f"data.path={data}"],
                    "prompt", "question", "answer", stage="sft")


def test_missing_reasoning_for_sft(tmp_path, capsys, runs_dir):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(20)))
    assert_rejected(capsys, runs_dir, ["data.source=jsonl", f"data.path={data}",
                                       "data.columns={prompt: question, solution: answer}"],
                    "sft: the training data lacks column(s)", "reasoning (or completion)", stage="sft")


def test_unknown_reward_name(capsys, runs_dir):
    assert_rejected(capsys, runs_dir, ["grpo.rewards=[{name: acuracy, weight: 1}]"],
                    "unknown reward 'acuracy'", "exact_match", "format", stage="all")


@pytest.mark.parametrize(
    "function, fragment",
    [("no_such_pkg.mod:fn", "cannot import 'no_such_pkg.mod'"),
     ("rewards.format:no_such_fn", "has no callable 'no_such_fn'"),
     ("rewards.format", "must look like 'package.module:function'")],
)
def test_unimportable_reward_function(capsys, runs_dir, function, fragment):
    assert_rejected(capsys, runs_dir, [f"grpo.rewards=[{{function: '{function}'}}]"], fragment, stage="all")


def test_missing_input_checkpoint(capsys, runs_dir):
    assert_rejected(capsys, runs_dir, [], "grpo.init_from = 'sft'", "make sft RUN=bad", stage="grpo")


def test_missing_input_path(capsys, runs_dir):
    assert_rejected(capsys, runs_dir, ["sft.init_from=./no/such/checkpoint"],
                    "sft.init_from = './no/such/checkpoint': no such checkpoint directory", stage="sft")


def test_vllm_requested_but_not_installed(capsys, runs_dir, monkeypatch):
    """`make install` installs vLLM; a machine without it is made by hiding the package."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    assert_rejected(capsys, runs_dir, ["grpo.use_vllm=true"], "grpo.use_vllm", "not installed", stage="all")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (a GPU machine)")
def test_a_model_shape_the_cpu_engine_cannot_serve_is_rejected_before_work(capsys, runs_dir):
    from r1pipeline import vllm_engine

    if not vllm_engine.on_cpu():
        pytest.skip("about vLLM's CPU build")
    assert_rejected(capsys, runs_dir, ["grpo.use_vllm=true"], "grpo.use_vllm = true with model.preset = 'tiny'",
                    "kv_lora_rank + qk_rope_head_dim = 576 only", stage="all")
    assert_rejected(capsys, runs_dir, ["eval.backend=vllm"], "eval.backend = 'vllm'", "tiny-vllm", stage="all")


def test_unknown_recipe(capsys, runs_dir):
    assert main(["--runs-dir", str(runs_dir), "--recipe", "nope", "sft"]) == 2
    assert "recipe 'nope' not found" in capsys.readouterr().err


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="must look like <section>.<field>=<value>"):
        apply_overrides({}, ["learning_rate=1"])


def test_overrides_nest_and_parse_numbers():
    recipe = apply_overrides(load_recipe("tiny"), ["grpo.learning_rate=1e-5", "model.config.hidden_size=64",
                                                   "data.kinds=[add]", "sft.bf16=true"])
    assert recipe["grpo"]["learning_rate"] == 1e-5
    assert recipe["model"]["config"]["hidden_size"] == 64
    assert recipe["data"]["kinds"] == ["add"]
    assert recipe["sft"]["bf16"] is True
    assert parse_value("3") == 3 and parse_value("x") == "x"


def test_coerce_reads_yaml_style_floats():
    assert coerce("2e-3", float) == (True, 0.002)
    assert coerce(True, int) == (False, True)
    assert coerce(3, float | None) == (True, 3.0)
    assert coerce(["a"], list[str]) == (True, ["a"])


def test_shipped_recipes_validate(tmp_path):
    from pathlib import Path

    from r1pipeline.config import RECIPES_DIR
    from r1pipeline.pipeline import STAGE_ORDER, plan

    for recipe in sorted(RECIPES_DIR.glob("*.yaml")):
        planned = plan(load_recipe(str(recipe)), list(STAGE_ORDER), Path(tmp_path) / recipe.stem)
        assert [stage.name for stage in planned] == list(STAGE_ORDER), recipe
    assert not any(Path(tmp_path).iterdir())
