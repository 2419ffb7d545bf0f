"""DataError, and the message for rows a dataset holds that the pipeline cannot use."""

MAX_LISTED = 5  # rows named in one message; the count says how many more there are


class DataError(ValueError):
    """A data config that cannot be turned into datasets."""


def row_name(index: int, row_id=None) -> str:
    """`row 3`, or `row 3 (id 'HumanEval/3')` where the dataset has an id column."""
    return f"row {index}" if row_id in (None, "") else f"row {index} (id {str(row_id)!r})"


def row_ids(ds) -> list:
    """Each row's id for error messages: the `id` column where the data has one."""
    return ds["id"] if "id" in ds.column_names else [None] * len(ds)


INVALID_ROWS = ("error", "drop")


def one_of(key: str, value, allowed: tuple[str, ...], hint: str = "") -> str:
    """`value` if it is one of `allowed`, else a DataError naming the data key and what is allowed."""
    if value not in allowed:
        raise DataError(f"{key}={value!r} is not one of {', '.join(allowed)}{hint}")
    return value


def unusable(split: str, what: str, bad: list[str], total: int, policy: str) -> None:
    """Rows the pipeline cannot use: an error naming them (`data.invalid_rows: error`, the default),
    or (`drop`) a warning with their count and the first few, the caller leaving them out. Real
    datasets hold such rows (NuminaMath's proofs, KodCode's pytest fixtures, TACO's classes)."""
    if not bad:
        return
    if policy == "error":
        raise bad_rows_error(split, what, bad, total)
    if len(bad) == total:
        raise bad_rows_error(split, what + " (data.invalid_rows='drop' would leave no row)", bad, total)
    print(f"[r1pipeline] data: dropping {bad_rows_error(split, what, bad, total)}", flush=True)


def bad_rows_error(split: str, what: str, bad: list[str], total: int) -> DataError:
    """One error for all of a split's unusable rows, so a user fixes the data (or the option) once,
    not row by row: how many, what is wrong, and the first few rows with their reasons."""
    listed = "; ".join(bad[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return DataError(f"{split} data: {len(bad)} of {total} rows {what}: {listed}{more}")
