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
SECTIONS = ("model", "data", "base", "sft", "grpo", "rejection", "align", "distill", "eval")

# Help texts shared by the stage modules' schemas (their `Options` dataclasses).
INIT_FROM_HELP = "'model', a stage name, or a checkpoint path / hub name"
REWARDS_HELP = "list of {name: <registered> | function: 'pkg.module:fn', weight: <float>, args: {...}}"
# What a stage's TRL fields are checked against.
TRL_CONFIG = {"base": "SFTConfig", "sft": "SFTConfig", "grpo": "GRPOConfig", "rejection": "SFTConfig",
              "align": "GRPOConfig", "distill": "SFTConfig"}
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
    """`base` with `changes` applied; a mapping set to null is dropped (a variant recipe leaves out a
    stage or a nested setting of the recipe it extends)."""
    out = dict(base)
    for key, value in changes.items():
        if value is None and isinstance(out.get(key), dict):
            del out[key]
            continue
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
    """The recipe's sections, and the `model` and `data` sections against the schemas their owners
    declare (r1pipeline/policy.py ModelSection, data/loading.py DataSection); coerced values are
    stored back into the recipe, so the run uses (and hashes) what was checked."""
    from data.loading import DataSection
    from r1pipeline.policy import ModelSection
    from r1pipeline.schema import validate

    for key, value in recipe.items():
        if key not in SECTIONS:
            raise unknown_key_error("recipe", key, SECTIONS)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"recipe section {key!r} must be a mapping, got {value!r}")
    if recipe.get("model"):
        recipe["model"] = validate("model", ModelSection, recipe["model"])
    if recipe.get("data"):
        source = recipe["data"].get("source", "synthetic")
        recipe["data"] = validate("data", DataSection, recipe["data"], source=source if isinstance(source, str) else None)


def stage_options(stage: str) -> type:
    """The schema of a stage's own keys (not TRL's), declared by its module: stages/<stage>.py Options."""
    import importlib

    return importlib.import_module(f"stages.{stage}").Options


# ---- type checking of TRL fields against their dataclass annotations ----------------------------


def describe_type(tp) -> str:
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


def check_trl_fields(stage: str, fields: dict, cls=None, where: str | None = None) -> dict:
    """Validate a stage's TRL keys by name and type; returns them with numeric strings coerced. With
    `cls`, the keys of a nested section (`where`, e.g. distill.on_policy) against that TRL config."""
    own = [] if cls is not None else [f.name for f in dataclasses.fields(stage_options(stage))]
    cls, where = cls or trl_config_class(stage), where or stage
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    checked = {}
    for key, value in fields.items():
        if key in MANAGED_KEYS:
            raise ConfigError(f"{where}.{key} is set by the run directory (runs/<RUN>/{stage}/); choose RUN=<name> instead")
        if key not in known:
            what = f"{cls.__name__} fields" + (f" and {sorted(own)}" if own else "")
            raise unknown_key_error(f"{where} ({what})", key, list(known) + own)
        ok, coerced = coerce(value, known[key].type)
        if not ok:
            raise ConfigError(f"{where}.{key} = {value!r} ({type(value).__name__}) has the wrong type: "
                              f"expected {describe_type(known[key].type)}")
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
