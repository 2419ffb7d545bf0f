"""Recipe sections declared by the code that reads them, validated in one pass.

Each section's owner declares its keys as a dataclass: the `model` section in r1pipeline/policy.py,
`data` in data/loading.py, each stage's own keys (those that are not TRL's) in its stage module, and
nested mappings (`rejection.sampling`, `align.reward_model`, `vllm_sync`) beside them. A field's
type is its annotation; `key()` adds the help text, an optional value check, and for `data` the
sources that read the key. `validate` reads a section against its dataclass: an unknown key (with
the closest names), a wrong type, a bad value, or a key the chosen data source does not read is a
ConfigError naming it; numeric strings are coerced and the coerced values are what the run uses.
A key set to null is unset (its default applies), which is how a variant recipe drops a key of the
recipe it extends.
TRL's own fields are checked the same way against TRL's config dataclasses (config.check_trl_fields).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

from r1pipeline import config as cfg


def key(default: Any = None, help: str = "", *, check: Callable[[Any], bool] | None = None, what: str = "",
        sources: tuple[str, ...] | None = None, schema: type | None = None):
    """A section key: its default, help text, a check of its value (`what` says what is allowed),
    the data sources that read it (None: all), or the schema of a nested mapping."""
    metadata = {"help": help, "check": check, "what": what, "sources": sources, "schema": schema}
    return dataclasses.field(default=default, metadata=metadata)


def fields(schema: type) -> dict[str, dataclasses.Field]:
    return {field.name: field for field in dataclasses.fields(schema)}


def validate(where: str, schema: type, values: dict | None, *, source: str | None = None) -> dict:
    """`values` checked against `schema` (see the module docstring); returns them coerced."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise cfg.ConfigError(f"{where} = {values!r} must be a mapping of {sorted(fields(schema))}")
    known, hints = fields(schema), typing.get_type_hints(schema)
    checked = {}
    for name, value in values.items():
        if name not in known:
            raise cfg.unknown_key_error(where, name, known)
        if value is None:  # null unsets a key (a variant recipe unsetting what it extends): the default applies
            continue
        meta = known[name].metadata
        ok, coerced = cfg.coerce(value, hints[name])
        if not ok:
            raise cfg.ConfigError(f"{where}.{name} = {value!r} ({type(value).__name__}) has the wrong type: "
                                  f"expected {cfg.describe_type(hints[name])}")
        readers = meta.get("sources")
        if source is not None and readers is not None and source not in readers:
            raise cfg.ConfigError(f"{where}.{name} applies to source {' | '.join(readers)} only; this recipe's "
                                  f"source is {source!r}, which does not read it")
        if meta.get("schema") is not None:
            coerced = validate(f"{where}.{name}", meta["schema"], coerced)
        if meta.get("check") is not None and not meta["check"](coerced):
            raise cfg.ConfigError(f"{where}.{name} = {value!r} must be {meta['what']}")
        checked[name] = coerced
    return checked


def defaults(schema: type) -> dict:
    """Every key of `schema` at its default."""
    return {name: field.default for name, field in fields(schema).items()}
