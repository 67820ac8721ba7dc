"""Natural per-user partition of any Hugging Face ``datasets.Dataset`` into federated clients.

A dataset with a user-id column and a text column (Stack Exchange posts, Reddit comments, reviews...) is
split into one client per user, the way TFF's Stack Overflow dataset is: every row of a user goes to that
user's client, in the dataset's row order (sort the dataset by date first for a chronological order).
Rows whose user id is missing (``None``) are skipped, as posts without an owner are in TFF's data.

Client order is deterministic: by user id, numerically when every id is an integer, otherwise by the ids'
string form. Client keys are the ids' string form (``str(user_id)``).
"""

from __future__ import annotations

import logging

import datasets

from fishmerge.errors import DataError

logger = logging.getLogger(__name__)

_TEXT_DTYPES = ("string", "large_string")


def _check_columns(dataset: datasets.Dataset, user_column: str, text_column: str) -> None:
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DataError(f"got a DatasetDict with splits {list(dataset)}; pass one split, e.g. dataset['train']")
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"expected a datasets.Dataset, got {type(dataset).__name__}; load it without streaming=True")
    columns = dataset.column_names
    for role, name in (("user-id", user_column), ("text", text_column)):
        if name not in columns:
            raise DataError(f"{role} column {name!r} not in the dataset (columns: {columns}); pass the right column name")
    feature = dataset.features[text_column]
    if getattr(feature, "dtype", None) not in _TEXT_DTYPES:
        raise DataError(f"text column {text_column!r} holds {feature}, not strings; pass a column of strings")


def _sort_key(ids: list[object]):
    if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return lambda i: (i, "")
    return lambda i: (0, str(i))


def partition_by_user(
    dataset: datasets.Dataset,
    *,
    user_column: str = "user_id",
    text_column: str = "text",
    min_examples: int = 1,
) -> dict[str, datasets.Dataset]:
    """Split ``dataset`` into one client per user.

    Args:
        dataset: Any in-memory or memory-mapped ``datasets.Dataset``.
        user_column: Column holding the user id (int or str; ``None`` rows are skipped).
        text_column: Column holding the text (must be strings); checked, and kept with all other columns.
        min_examples: Users with fewer rows are dropped.

    Returns:
        ``{str(user_id): rows of that user}`` in deterministic user order (see the module docstring); each
        value is ``dataset.select(...)`` of the user's rows, in dataset order, with every column.

    Raises:
        DataError: Not a single ``Dataset``, a missing or non-text column, ``min_examples < 1``, or no user
            with at least ``min_examples`` rows.
    """
    _check_columns(dataset, user_column, text_column)
    if min_examples < 1:
        raise DataError(f"min_examples must be at least 1, got {min_examples}; pass a positive threshold")
    rows: dict[object, list[int]] = {}
    skipped = 0
    for index, user in enumerate(dataset[user_column]):
        if user is None:
            skipped += 1
            continue
        rows.setdefault(user, []).append(index)
    kept = [user for user, indices in rows.items() if len(indices) >= min_examples]
    if not kept:
        raise DataError(
            f"no user has at least {min_examples} rows ({len(rows)} users, {len(dataset)} rows); lower min_examples"
        )
    kept.sort(key=_sort_key(kept))
    keys = [str(user) for user in kept]
    if len(set(keys)) != len(keys):
        raise DataError(f"user ids in {user_column!r} collide as strings (e.g. 1 and '1'); cast the column to one type")
    logger.info("%d clients from %d users (%d below %d rows, %d rows without a user)",
                len(kept), len(rows), len(rows) - len(kept), min_examples, skipped)
    return {key: dataset.select(rows[user]) for key, user in zip(keys, kept)}
