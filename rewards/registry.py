"""Reward functions by name, and user functions by dotted path.

Every reward has TRL's signature, `fn(prompts, completions, completion_ids=None, **columns) ->
list[float | None]`, where `None` means the reward does not apply to that row. A recipe lists them:

    rewards:
      - {name: format, weight: 0.5}
      - {name: soft_overlong, weight: 1.0, args: {max_length: 64}}   # keyword-only parameters
      - {function: "my_pkg.my_rewards:brevity", weight: 1.0}

TRL logs each reward's mean under the function's `__name__`, so a registered reward carries its
registry name and a user function its own name.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RewardFn = Callable[..., list]


@dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    weight: float
    columns: tuple[str, ...] = ()  # dataset columns the reward reads


REGISTRY: dict[str, tuple[RewardFn, tuple[str, ...]]] = {}


def register(name: str, columns: tuple[str, ...] = ()):
    """Register a reward under `name`; `columns` are the dataset columns it needs."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        fn.__name__ = name
        REGISTRY[name] = (fn, columns)
        return fn

    return wrap


def load_function(dotted: str) -> RewardFn:
    """Import `package.module:function`; the working directory is importable, as for `python -m`."""
    module_name, sep, attr = dotted.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {dotted!r} must look like 'package.module:function'")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is reported the same way
        raise ValueError(f"reward function {dotted!r}: cannot import {module_name!r}: {exc!r}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {dotted!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def bind(fn: RewardFn, args: dict | None, where: str) -> RewardFn:
    """Fix a reward's keyword-only parameters (`args: {max_length: 64}` in a recipe)."""
    if not args:
        return fn
    if not isinstance(args, dict):
        raise ValueError(f"{where}.args = {args!r} must be a mapping of parameter names to values")
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ValueError(f"{where}.args: {fn.__name__} has no parameter(s) {unknown}; its parameters: {allowed}")
    bound = functools.partial(fn, **args)
    bound.__name__ = fn.__name__  # TRL logs rewards under __name__
    return bound


def resolve(entries: list) -> list[Reward]:
    """Turn a recipe's `rewards` list into Reward objects; ValueError names what is wrong."""
    _load_builtins()
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"rewards must be a non-empty list of {{name|function, weight}}, got {entries!r}")
    rewards = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or len({"name", "function"} & entry.keys()) != 1:
            raise ValueError(f"rewards[{i}] = {entry!r} needs exactly one of 'name' or 'function'")
        extra = set(entry) - {"name", "function", "weight", "args"}
        if extra:
            raise ValueError(f"rewards[{i}] has unknown keys {sorted(extra)}; allowed: name, function, weight, args")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"rewards[{i}].weight = {weight!r} must be a number")
        if "name" in entry:
            if entry["name"] not in REGISTRY:
                raise ValueError(f"rewards[{i}]: unknown reward {entry['name']!r}; registered: {sorted(REGISTRY)}")
            fn, columns = REGISTRY[entry["name"]]
            rewards.append(Reward(entry["name"], bind(fn, entry.get("args"), f"rewards[{i}]"), float(weight), columns))
        else:
            fn = load_function(entry["function"])
            rewards.append(Reward(fn.__name__, bind(fn, entry.get("args"), f"rewards[{i}]"), float(weight)))
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"rewards are logged by name, and these repeat: {names}")
    return rewards


# The modules that register rewards. Not the math checker's helpers: importing rewards.math_warm
# runs sympy checks, which belongs in the checker's worker processes, not in the trainer.
BUILTIN_MODULES = ("answer", "code", "format", "language", "length", "math", "repetition", "reward_model")


def _load_builtins() -> None:
    for name in BUILTIN_MODULES:
        importlib.import_module(f"rewards.{name}")
