"""Turn the `data` section of a recipe into train/held-out datasets."""

from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from .coding import build_coding
from .synthetic import SYNTHETIC_KINDS, build_synthetic


class DataError(ValueError):
    """A data config that cannot be turned into datasets."""


SOURCES = ("synthetic", "coding", "hub", "json", "jsonl", "parquet", "csv")
# datasets' packaged builder for each local file source.
_FILE_BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
REQUIRED_COLUMNS = ("prompt", "solution")


def build_datasets(data_cfg: dict) -> DatasetDict:
    cfg = dict(data_cfg or {})
    source = cfg.get("source", "synthetic")
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    if source == "synthetic":
        return _synthetic(cfg)
    if source == "coding":
        return _coding(cfg)

    train, heldout = _load_external(source, cfg)
    mapping = dict(cfg.get("columns") or {})
    train = _map_columns(train, mapping, "train")
    heldout = _map_columns(heldout, mapping, "heldout") if heldout is not None else None
    if heldout is None:
        train, heldout = _carve_heldout(train, cfg)
    train = _cap(train, cfg.get("num_train"))
    heldout = _cap(heldout, cfg.get("num_heldout"))
    return DatasetDict({"train": train, "heldout": heldout})


def _synthetic(cfg: dict) -> DatasetDict:
    try:
        return build_synthetic(
            num_train=int(cfg.get("num_train", 2000)),
            num_heldout=int(cfg.get("num_heldout", 200)),
            seed=int(cfg.get("seed", 0)),
            kinds=list(cfg.get("kinds") or SYNTHETIC_KINDS),
            max_operand=int(cfg.get("max_operand", 99)),
            shortcut_fraction=float(cfg.get("shortcut_fraction", 0.0)),
        )
    except ValueError as err:
        raise DataError(str(err)) from err


def _coding(cfg: dict) -> DatasetDict:
    try:
        return build_coding(num_train=int(cfg.get("num_train", 2000)), num_heldout=int(cfg.get("num_heldout", 200)),
                            seed=int(cfg.get("seed", 0)), kinds=cfg.get("kinds"))
    except ValueError as err:
        raise DataError(str(err)) from err


def _load_external(source: str, cfg: dict) -> tuple[Dataset, Dataset | None]:
    path = cfg.get("path")
    if not path:
        raise DataError(f"data source {source!r} needs a 'path'")
    split = cfg.get("split", "train")
    heldout_split = cfg.get("heldout_split")

    if source == "hub":
        name = cfg.get("name")

        def load(s: str) -> Dataset:
            try:
                return datasets.load_dataset(path, name, split=s)
            except Exception as err:  # network, auth, bad name or split: all fatal here
                raise DataError(f"could not load hub dataset {path!r} (name={name!r}, split={s!r}): {err}") from err

        return load(split), load(heldout_split) if heldout_split else None

    if heldout_split:
        raise DataError(
            f"heldout_split={heldout_split!r} only applies to source 'hub'; "
            f"for a {source} file use heldout_path or heldout_fraction"
        )
    builder = _FILE_BUILDERS[source]
    heldout_path = cfg.get("heldout_path")
    return _load_file(builder, path), _load_file(builder, heldout_path) if heldout_path else None


def _load_file(builder: str, path: str) -> Dataset:
    if not Path(path).is_file():
        raise DataError(f"data file {str(path)!r} does not exist or is not a file")
    # A bare data_files path always lands in datasets' "train" split.
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _map_columns(ds: Dataset, mapping: dict, split: str) -> Dataset:
    """Rename dataset columns to ours; unmapped columns are kept as-is."""
    have = list(ds.column_names)

    def fail(what: str) -> DataError:
        return DataError(f"{split} data {what}; column mapping used: {mapping}; dataset columns: {have}")

    for ours, theirs in mapping.items():
        if theirs not in have:
            raise fail(f"has no column {theirs!r} (mapped to {ours!r})")
    if len(set(mapping.values())) != len(mapping):
        raise fail("maps one dataset column to several of ours")

    renames = {theirs: ours for ours, theirs in mapping.items() if theirs != ours}
    # A column already named like a mapping target is superseded by the mapping.
    clashing = [c for c in renames.values() if c in have and c not in renames]
    ds = ds.remove_columns(clashing).rename_columns(renames)

    for col in REQUIRED_COLUMNS:
        if col not in ds.column_names:
            raise fail(f"is missing required column {col!r}")
    # CSV/JSON readers parse answers like 85 as ints; rewards compare strings.
    if ds.features["solution"] != datasets.Value("string"):
        try:
            ds = ds.cast_column("solution", datasets.Value("string"))
        except Exception as err:
            raise fail(f"has a 'solution' column of type {ds.features['solution']} that is not text") from err
    return ds


def _carve_heldout(train: Dataset, cfg: dict) -> tuple[Dataset, Dataset]:
    fraction = float(cfg.get("heldout_fraction", 0.05))
    if not 0.0 < fraction < 1.0:
        raise DataError(f"heldout_fraction={fraction} must be strictly between 0 and 1")
    if len(train) < 2:
        raise DataError(f"cannot carve a held-out split out of {len(train)} row(s); give heldout_path or more data")
    parts = train.train_test_split(test_size=fraction, seed=int(cfg.get("seed", 0)), shuffle=True)
    return parts["train"], parts["test"]


def _cap(ds: Dataset, limit) -> Dataset:
    if limit is None or int(limit) >= len(ds):
        return ds
    return ds.select(range(int(limit)))
