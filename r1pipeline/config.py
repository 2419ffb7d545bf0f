"""Recipes: load a YAML recipe, apply command-line overrides, and validate it before any work.

A recipe has top-level `model` and `data` sections and one section per stage. A stage section holds
the stage's own keys (`init_from`, `rewards`) and passes every other key to the stage's TRL config
by its TRL name. Every mistake is reported as a ConfigError naming the key, the value and what is
allowed, before anything is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SECTIONS = ("model", "data", "sft", "grpo", "rejection", "align", "eval")

MODEL_KEYS = {
    "name_or_path": "hub name or local path of a causal LM to start from",
    "preset": "name of a built-in policy configuration (trained from scratch)",
    "config": "overrides of the preset's R1MoEConfig fields (DeepseekV3Config's plus fp8, bias_update_speed, ...)",
    "tokenizer": "hub name or path of the tokenizer (default: the model's; built offline for a preset)",
    "dtype": "float32 | bfloat16 | float16",
    "seed": "seed of a preset's random initialisation",
    "lora": "train LoRA adapters instead of every weight: peft.LoraConfig fields (r, lora_alpha or alpha, "
            "lora_dropout, target_modules (default 'all-linear'), ...); each stage's final/ is the merged model",
}
DATA_KEYS = {
    "source": "synthetic | coding | hub | json | jsonl | parquet | csv",
    "path": "hub name or local file of the dataset",
    "name": "hub dataset configuration",
    "split": "training split",
    "heldout_split": "held-out split of the same dataset",
    "heldout_path": "local file holding the held-out split",
    "heldout_fraction": "share of the training split held out when no held-out split is given",
    "columns": "mapping from our column names (prompt, solution, reasoning; answer: an explicit answer column; "
               "id: named in errors) to the dataset's; a nested field by its dotted path (reward_model.ground_truth)",
    "answer_format": "how a gold is reduced to its final answer at load (data/golds.py): auto (default) | gsm8k "
                     "(#### N) | boxed (last \\boxed{}) | column (the answer column) | raw (as written)",
    "test_format": "a code dataset's tests, mapped to sandbox problems (data/code_tests.py): kodcode | apps "
                   "(APPS, TACO) | humaneval",
    "invalid_rows": "rows that cannot be used (a gold with no final answer, tests the sandbox cannot run): error "
                    "(default: name them and stop) | drop (leave them out, with a warning naming the first few)",
    "seed": "seed of synthetic generation and of held-out carving",
    "num_train": "number of training problems",
    "num_heldout": "number of held-out problems",
    "kinds": "synthetic problem or coding task kinds",
    "max_operand": "largest operand of synthetic problems",
    "shortcut_fraction": "share of synthetic training problems repeated with only the answer line as reasoning (no working)",
    "system_prompt": "text placed before each question (default: the R1 template)",
    "prompt_format": "r1 (R1's plain template: base models, R1-Zero; default) | chat (a conversation rendered by the "
                     "tokenizer's own chat template, TRL's conversational format: instruct models)",
}
KEY_TYPES = {
    "model.name_or_path": str, "model.preset": str, "model.config": dict, "model.tokenizer": str,
    "model.dtype": str, "model.seed": int, "model.lora": dict,
    "data.source": str, "data.path": str, "data.name": str | None, "data.split": str, "data.heldout_split": str,
    "data.heldout_path": str, "data.heldout_fraction": float, "data.columns": dict, "data.seed": int,
    "data.num_train": int, "data.num_heldout": int, "data.kinds": list[str] | None, "data.max_operand": int,
    "data.shortcut_fraction": float, "data.system_prompt": str, "data.answer_format": str, "data.test_format": str,
    "data.prompt_format": str, "data.invalid_rows": str,
}
# Keys of a stage section that are ours, not TRL's.
_INIT_FROM = "'model', a stage name, or a checkpoint path / hub name"
_REWARDS = "list of {name: <registered> | function: 'pkg.module:fn', weight: <float>, args: {...}}"
_VLLM_SYNC = ("with use_vllm (colocate): mapping: verify (after every weight sync, read the engine's weights back "
              "and compare them with the trainer's, tensor by tensor; default true on vLLM's CPU build, false on GPU "
              "and for FP8 policies), timeout (seconds a sync may take before the run stops with an error; default 600)")
STAGE_KEYS = {
    "sft": {"init_from": _INIT_FROM},
    "grpo": {"init_from": _INIT_FROM, "rewards": _REWARDS,
             "shuffle_rewards": "control runs: permute each group's rewards among its completions "
                                "(same compute, no learning signal; default false)",
             "vllm_sync": _VLLM_SYNC},
    "rejection": {
        "init_from": _INIT_FROM + " to fine-tune (default 'model': R1 retrains the base)",
        "sample_from": "the stage name or checkpoint path to sample from (default 'grpo')",
        "rewards": _REWARDS + "; a sample is correct when every reward that applies reaches accept_threshold",
        "accept_threshold": "reward a sample needs from each applicable reward to count as correct (default 1.0)",
        "sampling": "mapping: num_samples, max_new_tokens, temperature, top_p, batch_size, num_prompts, seed",
        "filters": "mapping of readability filters (data/filters.py) to settings, or false to switch one off",
        "chat_ratio": "share of non-reasoning chat rows in the SFT set (default 0.1)",
    },
    "align": {
        "init_from": _INIT_FROM,
        "rewards": _REWARDS + "; helpfulness/harmlessness without args.path use the stage's reward model",
        "general_ratio": "share of general (chat) prompts in the RL mixture (default 0.3)",
        "vllm_sync": _VLLM_SYNC,
        "reward_model": "mapping: path (a sequence-classification checkpoint) or training settings "
                        "(num_pairs, max_steps, learning_rate, hidden_size, num_layers, seed)",
    },
}
# What a stage's TRL fields are checked against.
TRL_CONFIG = {"sft": "SFTConfig", "grpo": "GRPOConfig", "rejection": "SFTConfig", "align": "GRPOConfig"}
# Set by the run directory, never by a recipe.
MANAGED_KEYS = {"output_dir", "resume_from_checkpoint", "logging_dir", "overwrite_output_dir"}


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message says what and what would be valid."""


def trl_config_class(stage: str):
    import trl

    return getattr(trl, TRL_CONFIG[stage])


def load_recipe(recipe: str) -> dict:
    """A recipe by name (recipes/<name>.yaml) or by path."""
    path = Path(recipe)
    if not path.is_file() and (RECIPES_DIR / f"{recipe}.yaml").is_file():  # a name ("r1-qwen2.5-1.5b")
        path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"recipe {recipe!r} not found: give a file path or one of {known}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(loaded).__name__}")
    base = loaded.pop("extends", None)
    if base is not None:  # a variant: another recipe with some fields changed
        if not isinstance(base, str) or Path(base).stem == path.stem:
            raise ConfigError(f"recipe {path}: extends = {base!r} must name another recipe")
        loaded = merged(load_recipe(base), loaded)
    return loaded


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_value(text: str) -> Any:
    # YAML 1.1 reads "1e-5" as a string; learning rates are written that way, so read numbers first.
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` (or `section.key.sub=value`) overrides to a copy of the recipe."""
    recipe = yaml.safe_load(yaml.safe_dump(recipe))
    for item in overrides:
        dotted, sep, text = item.partition("=")
        parts = dotted.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r} must look like <section>.<field>=<value>, e.g. grpo.learning_rate=1e-5")
        node = recipe.setdefault(parts[0], {})
        for part in parts[1:-1]:
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not inside a mapping")
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {parts[-2]!r} is not a mapping")
        node[parts[-1]] = parse_value(text)
    return recipe


def unknown_key_error(where: str, key: str, allowed: typing.Iterable[str]) -> ConfigError:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key, allowed, n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else f"allowed: {', '.join(allowed)}"
    return ConfigError(f"{where}: unknown key {key!r}; {hint}")


def check_sections(recipe: dict) -> None:
    for key, value in recipe.items():
        if key not in SECTIONS:
            raise unknown_key_error("recipe", key, SECTIONS)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"recipe section {key!r} must be a mapping, got {value!r}")
    for section, keys in (("model", MODEL_KEYS), ("data", DATA_KEYS)):
        for key, value in (recipe.get(section) or {}).items():
            if key not in keys:
                raise unknown_key_error(section, key, keys)
            expected = KEY_TYPES.get(f"{section}.{key}")
            if expected is not None and not coerce(value, expected)[0]:
                raise ConfigError(f"{section}.{key} = {value!r} ({type(value).__name__}) has the wrong type: "
                                  f"expected {_describe(expected)}")


# ---- type checking of TRL fields against their dataclass annotations ----------------------------


def _describe(tp) -> str:
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return " | ".join(repr(m.value) for m in tp)
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(value: Any, tp) -> tuple[bool, Any]:
    """(matches, value): whether `value` fits annotation `tp`, with numeric strings read as floats."""
    if tp is Any or tp is typing.Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, coerced = coerce(value, arg)
            if ok:
                return True, coerced
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        if not args:
            return True, list(value)
        out = []
        for item in value:
            ok, coerced = coerce(item, args[0])
            if not ok:
                return False, value
            out.append(coerced)
        return True, out
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp} or isinstance(value, tp), value
    if isinstance(tp, type):
        return isinstance(value, (tp, dict)), value
    return True, value


def check_trl_fields(stage: str, fields: dict) -> dict:
    """Validate a stage's TRL keys by name and type; returns them with numeric strings coerced."""
    cls = trl_config_class(stage)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    checked = {}
    for key, value in fields.items():
        if key in MANAGED_KEYS:
            raise ConfigError(f"{stage}.{key} is set by the run directory (runs/<RUN>/{stage}/); choose RUN=<name> instead")
        if key not in known:
            raise unknown_key_error(f"{stage} ({cls.__name__} fields and {sorted(STAGE_KEYS[stage])})", key,
                                    list(known) + list(STAGE_KEYS[stage]))
        ok, coerced = coerce(value, known[key].type)
        if not ok:
            raise ConfigError(f"{stage}.{key} = {value!r} ({type(value).__name__}) has the wrong type: "
                              f"expected {_describe(known[key].type)}")
        checked[key] = coerced
    return checked


def field_default(stage: str, key: str):
    for f in dataclasses.fields(trl_config_class(stage)):
        if f.name == key:
            return f.default
    raise KeyError(key)


def check_grpo_batch(fields: dict, world_size: int, stage: str = "grpo") -> None:
    """TRL's rule, checked before any work: a generation batch holds whole groups."""
    num_generations = fields.get("num_generations", field_default("grpo", "num_generations"))
    if not isinstance(num_generations, int) or num_generations < 2:
        raise ConfigError(f"{stage}.num_generations = {num_generations!r}: GRPO needs at least 2 completions per prompt")
    if fields.get("generation_batch_size") is not None:
        batch = fields["generation_batch_size"]
        how = f"generation_batch_size ({batch})"
    else:
        per_device = fields.get("per_device_train_batch_size", field_default("grpo", "per_device_train_batch_size"))
        steps = fields.get("steps_per_generation") or fields.get("gradient_accumulation_steps", 1)
        batch = per_device * world_size * steps
        how = (f"per_device_train_batch_size ({per_device}) x processes ({world_size}) x "
               f"steps_per_generation ({steps}) = {batch}")
    if batch % num_generations:
        divisors = [d for d in range(2, batch + 1) if batch % d == 0]
        raise ConfigError(f"{stage}: the generation batch {how} is not divisible by num_generations "
                          f"({num_generations}); use num_generations in {divisors} or change the batch")
