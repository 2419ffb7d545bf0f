"""An offline mirror of the Hugging Face Hub: `R1PIPELINE_HUB_MIRROR=<dir>`.

Clusters without internet (and this project's CI) keep the models and datasets a recipe names in a
plain directory, laid out by hub name:

    <dir>/<org>/<model>/                     config.json, tokenizer files, weights
    <dir>/datasets/<org>/<dataset>/          data files (train.jsonl, test.parquet, ...)
    <dir>/datasets/<org>/<dataset>/<config>/ a named configuration's files (GSM8K's `main`)

A hub name found there is loaded from there; anything else goes to the hub as usual. The recipe
keeps its real hub names, so the same recipe runs online, offline and in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

MIRROR_ENV = "R1PIPELINE_HUB_MIRROR"


def _mirror() -> Path | None:
    root = os.environ.get(MIRROR_ENV)
    return Path(root) if root else None


def model_path(name_or_path: str) -> str:
    """A model's local directory in the mirror, or the name unchanged."""
    root = _mirror()
    if root is None or Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")):
        return name_or_path
    local = root / name_or_path
    return str(local) if (local / "config.json").is_file() else name_or_path


def dataset_path(path: str, config: str | None) -> tuple[str, str | None]:
    """(path, config) to give `datasets.load_dataset`: the mirror's directory of that dataset (and
    configuration) with no config name, or the arguments unchanged."""
    root = _mirror()
    if root is None or Path(path).exists():
        return path, config
    local = root / "datasets" / path
    if config and (local / config).is_dir():
        return str(local / config), None
    return (str(local), None) if local.is_dir() else (path, config)
