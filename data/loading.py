"""Turn the `data` section of a recipe into train/held-out datasets."""

import dataclasses
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from r1pipeline.schema import key

from .code_tests import TEST_FORMATS, adapt_tests
from .coding import build_coding
from .errors import INVALID_ROWS, DataError, one_of, row_ids, row_name, unusable
from .golds import ANSWER_FORMATS, gold_columns, reduce_golds
from .synthetic import SYNTHETIC_KINDS, build_synthetic
from .template import PROMPT_FORMATS, R1_SYSTEM_PROMPT

SOURCES = ("synthetic", "coding", "hub", "json", "jsonl", "parquet", "csv")
# datasets' packaged builder for each local file source.
_FILE_BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
FILES = tuple(_FILE_BUILDERS)
EXTERNAL = ("hub", *FILES)


def _one_of(values):
    return dict(check=lambda value: value in values, what=f"one of {', '.join(values)}")


@dataclasses.dataclass
class DataSection:
    """A recipe's `data` section (r1pipeline/schema.py). A key that only some sources read (`sources`)
    is refused for the others: `max_operand` on a hub dataset is a mistake, not a no-op."""

    source: str = key("synthetic", " | ".join(SOURCES), **_one_of(SOURCES))
    path: str | None = key(None, "hub name or local file of the dataset", sources=EXTERNAL)
    name: str | None = key(None, "hub dataset configuration", sources=("hub",))
    split: str = key("train", "training split", sources=("hub",))
    heldout_split: str | None = key(None, "held-out split of the same dataset", sources=("hub",))
    heldout_path: str | None = key(None, "local file holding the held-out split", sources=FILES)
    heldout_fraction: float = key(0.05, "share of the training split held out when no held-out split is given",
                                  sources=EXTERNAL, check=lambda share: 0 < share < 1, what="a share in (0, 1)")
    columns: dict | None = key(None, "mapping from our column names (prompt, solution, reasoning; answer: an explicit "
                                     "answer column; id: named in errors) to the dataset's; a nested field by its "
                                     "dotted path (reward_model.ground_truth)", sources=EXTERNAL)
    answer_format: str = key("auto", "how a gold is reduced to its final answer at load (data/golds.py): auto | "
                                     "gsm8k (#### N) | boxed (last \\boxed{}) | column (the answer column) | raw (as "
                                     "written)", sources=EXTERNAL, **_one_of(ANSWER_FORMATS))
    test_format: str | None = key(None, "a code dataset's tests, mapped to sandbox problems (data/code_tests.py): "
                                        "kodcode | apps (APPS, TACO) | humaneval", sources=EXTERNAL,
                                  **_one_of(TEST_FORMATS))
    invalid_rows: str = key("error", "rows that cannot be used (a gold with no final answer, tests the sandbox cannot "
                                     "run): error (name them and stop) | drop (leave them out, with a warning naming "
                                     "the first few)", sources=EXTERNAL, **_one_of(INVALID_ROWS))
    seed: int = key(0, "seed of synthetic generation and of held-out carving")
    num_train: int | None = key(None, "number of training problems (a cap for external datasets)")
    num_heldout: int | None = key(None, "number of held-out problems (a cap for external datasets)")
    kinds: list[str] | None = key(None, "synthetic problem or coding task kinds", sources=("synthetic", "coding"))
    max_operand: int = key(99, "largest operand of synthetic problems", sources=("synthetic",))
    addends: int = key(2, "numbers each synthetic 'add' problem sums (3: 'What is 23 + 48 + 19?')",
                       sources=("synthetic",))
    shortcut_fraction: float = key(0.0, "share of synthetic training problems repeated with only the answer line as "
                                        "reasoning (no working)", sources=("synthetic",))
    slip_fraction: float = key(0.0, "share of worked-out training additions with a carry whose working drops one "
                                    "carry, stating a wrong answer (the gold stays right)", sources=("synthetic",))
    system_prompt: str = key(R1_SYSTEM_PROMPT, "text placed before each question (default: the R1 template)")
    prompt_format: str = key("r1", "r1 (R1's plain template: base models, R1-Zero) | chat (a conversation rendered by "
                                   "the tokenizer's own chat template, TRL's conversational format: instruct models)",
                             **_one_of(PROMPT_FORMATS))


def build_datasets(data_cfg: dict, sample: int | None = None) -> DatasetDict:
    """Train and held-out datasets. `sample` (a dry run): only the first `sample` rows of each split
    of an external dataset are read (a hub dataset streamed), checked the same way."""
    cfg = dict(data_cfg or {})
    source = cfg.get("source", "synthetic")
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    if source == "synthetic":
        return _synthetic(cfg)
    if source == "coding":
        return _coding(cfg)

    prepare = _rows_preparer(cfg)
    train, heldout = _load_external(source, cfg, sample)
    train = prepare(train, "train")
    heldout = prepare(heldout, "heldout") if heldout is not None else None
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
            slip_fraction=float(cfg.get("slip_fraction", 0.0)),
            addends=int(cfg.get("addends", 2)),
        )
    except ValueError as err:
        raise DataError(str(err)) from err


def _coding(cfg: dict) -> DatasetDict:
    try:
        return build_coding(num_train=int(cfg.get("num_train", 2000)), num_heldout=int(cfg.get("num_heldout", 200)),
                            seed=int(cfg.get("seed", 0)), kinds=cfg.get("kinds"))
    except ValueError as err:
        raise DataError(str(err)) from err


def _load_external(source: str, cfg: dict, sample: int | None = None) -> tuple[Dataset, Dataset | None]:
    path = cfg.get("path")
    if not path:
        raise DataError(f"data source {source!r} needs a 'path'")
    split = cfg.get("split", "train")
    heldout_split = cfg.get("heldout_split")

    if source == "hub":
        from r1pipeline.hub import dataset_path

        local, config = dataset_path(path, cfg.get("name"))

        def load(s: str) -> Dataset:
            try:
                if sample:  # the first rows only, streamed: a dry run downloads no whole dataset
                    stream = datasets.load_dataset(local, config, split=s, streaming=True)
                    return Dataset.from_list(list(stream.take(sample)))
                return datasets.load_dataset(local, config, split=s)
            except Exception as err:  # network, auth, bad name or split: all fatal here
                raise DataError(f"could not load hub dataset {path!r} (name={cfg.get('name')!r}, split={s!r}): {err}") \
                    from err

        return load(split), load(heldout_split) if heldout_split else None

    if heldout_split:
        raise DataError(
            f"heldout_split={heldout_split!r} only applies to source 'hub'; "
            f"for a {source} file use heldout_path or heldout_fraction"
        )
    builder = _FILE_BUILDERS[source]
    heldout_path = cfg.get("heldout_path")
    train, heldout = _load_file(builder, path), _load_file(builder, heldout_path) if heldout_path else None
    if sample:
        train, heldout = _cap(train, sample), _cap(heldout, sample) if heldout is not None else None
    return train, heldout


def _load_file(builder: str, path: str) -> Dataset:
    if not Path(path).is_file():
        raise DataError(f"data file {str(path)!r} does not exist or is not a file")
    # A bare data_files path always lands in datasets' "train" split.
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _rows_preparer(cfg: dict):
    """How a loaded split becomes ours, its options checked before any data is read: a code
    dataset's tests mapped to sandbox problems (data/code_tests.py), or a math dataset's columns
    mapped and its golds reduced to final answers (data/golds.py). Rows that cannot be used are an
    error, or with `invalid_rows: drop` left out with a warning (data/errors.py)."""
    invalid_rows = one_of("invalid_rows", cfg.get("invalid_rows", "error"), INVALID_ROWS)
    if cfg.get("test_format") is not None:
        test_format = one_of("test_format", cfg["test_format"], TEST_FORMATS,
                             " (apps also reads TACO, which keeps APPS's columns)")
        given = [key for key in ("columns", "answer_format") if cfg.get(key) is not None]
        if given:
            raise DataError(f"test_format={test_format!r} reads the dataset's own columns and tests; "
                            f"{' and '.join(given)} do not apply to it")
        return lambda ds, split: adapt_tests(ds, test_format, split, invalid_rows)
    answer_format = one_of("answer_format", cfg.get("answer_format", "auto"), ANSWER_FORMATS)
    mapping = dict(cfg.get("columns") or {})
    required = ("prompt", *gold_columns(answer_format, mapping))

    def prepare(ds: Dataset, split: str) -> Dataset:
        ds = _prompt_text(_map_columns(ds, mapping, split, required), split, invalid_rows)
        return reduce_golds(ds, answer_format, split, mapping, invalid_rows)

    return prepare


def _map_columns(ds: Dataset, mapping: dict, split: str, required: tuple[str, ...]) -> Dataset:
    """Rename dataset columns to ours; unmapped columns are kept as-is. A nested field is named by
    its dotted path (DAPO-Math's `reward_model.ground_truth`)."""
    if any("." in theirs and theirs not in ds.column_names for theirs in mapping.values()):
        ds = ds.flatten()
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

    for col in required:
        if col not in ds.column_names:
            raise fail(f"is missing required column {col!r}")
    # CSV/JSON readers parse answers like 85 as ints; rewards compare strings.
    if "solution" in ds.column_names and ds.features["solution"] != datasets.Value("string"):
        try:
            ds = ds.cast_column("solution", datasets.Value("string"))
        except Exception as err:
            raise fail(f"has a 'solution' column of type {ds.features['solution']} that is not text") from err
    return ds


def _prompt_text(ds: Dataset, split: str, invalid_rows: str = "error") -> Dataset:
    """A prompt written as a chat ([{role, content}], DAPO-Math's) becomes its user turn's text: the
    recipe's system prompt and the R1 template wrap it like any other question."""
    prompts = ds["prompt"]
    if all(isinstance(prompt, str) for prompt in prompts):
        return ds
    texts, bad, kept = [], [], []
    for index, (prompt, row_id) in enumerate(zip(prompts, row_ids(ds))):
        turns = prompt if isinstance(prompt, list) else []
        users = [turn.get("content") for turn in turns if isinstance(turn, dict) and turn.get("role") == "user"]
        if isinstance(prompt, str) or (len(users) == 1 and isinstance(users[0], str)):
            texts.append(prompt if isinstance(prompt, str) else users[0])
            kept.append(index)
        else:
            bad.append(f"{row_name(index, row_id)}: {str(prompt)[:80]!r}")
    unusable(split, "have a prompt that is neither text nor a chat with one user turn", bad, len(ds), invalid_rows)
    return ds.select(kept).remove_columns("prompt").add_column("prompt", texts)


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
