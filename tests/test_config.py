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


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["distill.on_policy={max_step: 3}"], ["distill.on_policy (DistillationConfig fields)", "'max_step'",
                                               "did you mean max_steps"]),
        (["distill.on_policy={beta: high}"], ["distill.on_policy.beta = 'high'", "expected float"]),
        (["distill.on_policy={use_vllm: true}"], ["distill.on_policy.use_vllm = true", "transformers"]),
        (["distill.on_policy={output_dir: /tmp/x}"], ["distill.on_policy.output_dir is set by the run directory"]),
        (["distill.data_from=grpo"], ["distill.data_from = 'grpo' must be 'rejection' (stage 3) or unset"]),
    ],
)
def test_distill_keys_are_checked_before_work(capsys, runs_dir, args, fragments):
    assert_rejected(capsys, runs_dir, args, *fragments, stage="all")


def test_distill_data_from_a_stage_that_has_not_run(capsys, runs_dir):
    assert_rejected(capsys, runs_dir, [], "distill.data_from = 'rejection'", "make rejection RUN=bad",
                    "or unset distill.data_from", stage="distill")


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


def file_recipe(tmp_path, **data) -> str:
    """tiny.yaml with its data section replaced (its synthetic-only keys would be refused for a file), and
    without stage 0 (its corpus is written from synthetic problems)."""
    import yaml

    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(20)))
    path = tmp_path / "file.yaml"
    recipe = load_recipe("tiny")
    del recipe["base"]
    for stage in ("sft", "rejection"):
        recipe[stage]["init_from"] = "model"
    path.write_text(yaml.safe_dump({**recipe, "data": {"source": "jsonl", "path": str(rows), **data}}))
    return str(path)


def test_missing_dataset_columns(tmp_path, capsys, runs_dir):
    assert_rejected(capsys, runs_dir, ["--recipe", file_recipe(tmp_path)], "prompt", "question", "answer", stage="sft")


def test_missing_reasoning_for_sft(tmp_path, capsys, runs_dir):
    assert_rejected(capsys, runs_dir, ["--recipe", file_recipe(tmp_path, columns={"prompt": "question",
                                                                                   "solution": "answer"})],
                    "sft: the training data lacks column(s)", "reasoning (or completion)", stage="sft")


def test_a_data_key_the_source_does_not_read_is_refused(tmp_path, capsys, runs_dir):
    """tiny.yaml's synthetic-only keys (addends, max_operand, kinds, ...) are a mistake on a dataset file."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(20)))
    assert_rejected(capsys, runs_dir, ["data.source=jsonl", f"data.path={data}"],
                    "data.addends applies to source synthetic only", "'jsonl'", stage="sft")
    assert_rejected(capsys, runs_dir, ["data.heldout_split=test"], "data.heldout_split applies to source hub only",
                    stage="sft")


def test_coerced_values_are_stored_back(runs_dir):
    from r1pipeline.pipeline import plan

    recipe = apply_overrides(load_recipe("tiny"), ["data.shortcut_fraction='0.5'", "sft.learning_rate='1e-4'",
                                                   "data.num_train=64", "rejection.chat_ratio='0.2'"])
    plan(recipe, ["base", "sft", "grpo", "rejection"], runs_dir)
    assert recipe["data"]["shortcut_fraction"] == 0.5 and recipe["sft"]["learning_rate"] == 1e-4
    assert recipe["rejection"]["chat_ratio"] == 0.2


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


def test_shipped_recipes_validate(tmp_path, monkeypatch, hub_mirror):
    """Every shipped recipe plans its stages; the real ones read their hub names from the test mirror."""
    from pathlib import Path

    from r1pipeline.config import RECIPES_DIR
    from r1pipeline.pipeline import STAGE_ORDER, plan

    monkeypatch.setenv("R1PIPELINE_HUB_MIRROR", str(hub_mirror))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for recipe in sorted(RECIPES_DIR.glob("*.yaml")):
        loaded = load_recipe(str(recipe))
        stages = [stage for stage in STAGE_ORDER if stage in loaded]
        planned = plan(loaded, stages, Path(tmp_path) / recipe.stem, dry_run=True)
        assert [stage.name for stage in planned] == stages and stages, recipe
    assert not any(Path(tmp_path).iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without GPUs")
@pytest.mark.parametrize("name, sharded", [("fsdp1", "FSDP1"), ("zero3.yaml", "ZeRO-3")])
def test_a_sharded_accelerate_config_without_gpus_is_refused(capsys, runs_dir, tmp_path, name, sharded):
    """accelerate runs an FSDP1/DeepSpeed config on CPU as plain data parallel (MULTI_CPU): refused, not
    silently unsharded (FSDP2 runs there for real: tests/test_sharding.py). A dry run still plans it."""
    from r1pipeline.config import RECIPES_DIR

    config = str(RECIPES_DIR / "accelerate" / name)
    if name == "fsdp1":
        config = tmp_path / "fsdp1.yaml"
        config.write_text((RECIPES_DIR / "accelerate" / "fsdp2.yaml").read_text().replace("fsdp_version: 2",
                                                                                          "fsdp_version: 1"))
    assert_rejected(capsys, runs_dir, ["--accelerate-config", str(config), "sft.init_from=model"],
                    f"({sharded}) on a machine without GPUs", "fsdp2-cpu2.yaml", stage="sft")
    assert run_cli(runs_dir, "--accelerate-config", str(config), "--dry-run", "sft.init_from=model", stage="sft") == 0


def test_a_variant_drops_a_section_of_the_recipe_it_extends_with_null():
    """tiny-code.yaml extends tiny.yaml without its stage 0 (`base: null`); a null key inside a section
    stays null (its default applies when the section is read)."""
    tiny, code = load_recipe("tiny"), load_recipe("tiny-code")
    assert "base" in tiny and "base" not in code
    assert code["sft"]["init_from"] == "model" and code["rejection"]["init_from"] == "model"
    assert code["data"]["slip_fraction"] is None and code["sft"]["learning_rate"] == tiny["sft"]["learning_rate"]
