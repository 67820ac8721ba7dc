"""partition_by_user: natural per-user clients from a datasets.Dataset, thresholds, order, and refusals."""

from __future__ import annotations

import datasets
import pytest

from fishmerge.data.partition import partition_by_user
from fishmerge.errors import DataError


def make(users, texts=None, **extra):
    texts = texts if texts is not None else [f"t{i}" for i in range(len(users))]
    return datasets.Dataset.from_dict({"user_id": users, "text": texts, **extra})


def test_rows_grouped_in_dataset_order_with_all_columns():
    ds = make([10, 2, 10, None, 2, 10], score=[0, 1, 2, 3, 4, 5])
    clients = partition_by_user(ds)
    assert list(clients) == ["2", "10"]  # integer ids sort numerically
    assert clients["10"]["text"][:] == ["t0", "t2", "t5"]
    assert clients["10"]["score"][:] == [0, 2, 5]
    assert clients["2"]["text"][:] == ["t1", "t4"]
    assert sum(len(c) for c in clients.values()) == len(ds) - 1  # the row without a user is skipped


def test_threshold_and_string_ids():
    ds = make(["bob", "amy", "bob", "cat", "amy", "bob"])
    assert list(partition_by_user(ds, min_examples=2)) == ["amy", "bob"]
    assert {k: len(v) for k, v in partition_by_user(ds, min_examples=3).items()} == {"bob": 3}
    assert list(partition_by_user(ds)) == ["amy", "bob", "cat"]


def test_custom_column_names():
    ds = datasets.Dataset.from_dict({"author": [1, 1, 2], "body": ["a", "b", "c"]})
    clients = partition_by_user(ds, user_column="author", text_column="body")
    assert {k: v["body"][:] for k, v in clients.items()} == {"1": ["a", "b"], "2": ["c"]}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"user_column": "owner"}, "user-id column 'owner'"),
        ({"text_column": "body"}, "text column 'body'"),
        ({"text_column": "score"}, "not strings"),
        ({"min_examples": 0}, "min_examples"),
        ({"min_examples": 4}, "no user has at least 4"),
    ],
)
def test_refusals_name_problem_and_fix(kwargs, match):
    ds = make([1, 1, 2], score=[1, 2, 3])
    with pytest.raises(DataError, match=match) as excinfo:
        partition_by_user(ds, **kwargs)
    assert "\n" not in str(excinfo.value)


def test_refuses_dataset_dict_and_empty_dataset():
    ds = make([1, 2])
    with pytest.raises(DataError, match=r"dataset\['train'\]"):
        partition_by_user(datasets.DatasetDict({"train": ds}))
    with pytest.raises(DataError, match="no user"):
        partition_by_user(make([None, None]))
