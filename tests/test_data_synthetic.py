"""Synthetic users: determinism to the byte, TFF-like tokens, distinct splits, and users that differ."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter

import numpy as np
import pytest

from fishmerge.data.stackoverflow import StackOverflowReader
from fishmerge.data.synthetic import (
    TOPICS,
    general_sentences,
    synthetic_user,
    topic_sentences,
    topic_vocabulary,
    write_synthetic_stackoverflow,
)
from fishmerge.errors import DataError

TFF_TOKEN = re.compile(r"^([a-z0-9]+('[a-z0-9]+)*|[^\sa-z0-9])$")
NOUNS = {t: {w for w in topic_vocabulary(t) if all(w not in topic_vocabulary(o) for o in TOPICS if o != t)} for t in TOPICS}


def small(path, seed=0, **kw):
    args = dict(num_train_users=6, num_heldout_users=2, num_test_users=2, sentences_per_user=(5, 12), seed=seed)
    return write_synthetic_stackoverflow(path, **{**args, **kw})


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    digest = [hashlib.sha256(small(tmp_path / f"{i}.sqlite", seed=s).read_bytes()).hexdigest()
              for i, s in enumerate([7, 7, 8])]
    assert digest[0] == digest[1] != digest[2]
    assert general_sentences(50, 3) == general_sentences(50, 3) != general_sentences(50, 4)
    assert topic_sentences("web", 20, 1) == topic_sentences("web", 20, 1)


def test_layout_counts_and_distinct_users(tmp_path):
    path = small(tmp_path / "syn.sqlite")
    with StackOverflowReader(path) as reader:
        splits = {s: reader.clients(s) for s in ("train", "heldout", "test")}
        assert [c.client_id for c in splits["train"]] == [f"{i:08d}" for i in range(6)]
        assert [c.client_id for c in splits["heldout"]] == ["00000006", "00000007"]
        assert [c.client_id for c in splits["test"]] == ["00000008", "00000009"]
        for split, clients in splits.items():
            for client_id, n in clients:
                assert 5 <= n <= 12
                examples = list(reader.examples(split, client_id))
                assert len(examples) == n
                assert [e["creation_date"] for e in examples] == sorted(e["creation_date"] for e in examples)
                for ex in examples:
                    assert all(TFF_TOKEN.match(t) for t in str(ex["tokens"]).split(" ")), ex["tokens"]
                    assert ex["type"] in ("question", "answer")
                    topic, noun = str(ex["tags"]).split("|")
                    assert topic in TOPICS and noun in topic_vocabulary(topic)
    # a user's text does not depend on how many users are drawn
    bigger = small(tmp_path / "big.sqlite", num_train_users=9)
    with StackOverflowReader(path) as a, StackOverflowReader(bigger) as b:
        assert list(a.examples("train", "00000003")) == list(b.examples("train", "00000003"))


def test_topic_nouns_are_exclusive_and_sentences_are_on_topic():
    for topic in TOPICS:
        assert len(NOUNS[topic]) >= 15
        for sentence in topic_sentences(topic, 30, seed=0):
            words = set(sentence.split())
            assert not any(words & NOUNS[other] for other in TOPICS if other != topic), sentence
    general = " ".join(general_sentences(400, seed=0)).split()
    hits = Counter(t for w in general for t in TOPICS if w in NOUNS[t])
    assert set(hits) == set(TOPICS)  # every topic appears a little
    assert sum(hits.values()) < 0.1 * len(general)  # but lightly


def topic_histogram(sentences: list[str]) -> np.ndarray:
    counts = np.array([sum(w in NOUNS[t] for s in sentences for w in s.split()) for t in TOPICS], dtype=float)
    return counts / counts.sum()


def test_users_differ_in_topic_mix_and_phrasing():
    users = [synthetic_user(i, seed=0) for i in range(8)]
    texts = [[str(e["tokens"]) for e in u.examples(300)] for u in users]
    hists = [topic_histogram(t) for t in texts]
    for user, hist in zip(users, hists):  # the text follows the user's drawn topic mix
        assert 0.5 * np.abs(hist - user.topic_mix).sum() < 0.2
    tv = [0.5 * np.abs(a - b).sum() for a, b in itertools.combinations(hists, 2)]
    assert np.mean(tv) > 0.4 and max(tv) > 0.8
    first_words = [Counter(s.split()[0] for s in t) for t in texts]
    assert len({c.most_common(1)[0][0] for c in first_words}) >= 3  # favourite openings differ too


def test_errors(tmp_path):
    with pytest.raises(DataError, match="unknown topic"):
        topic_sentences("astrology", 3, 0)
    with pytest.raises(DataError, match="seed"):
        general_sentences(3, -1)
    with pytest.raises(DataError, match="sentences_per_user"):
        write_synthetic_stackoverflow(tmp_path / "a.sqlite", sentences_per_user=(5, 2))
    with pytest.raises(DataError, match="train user"):
        write_synthetic_stackoverflow(tmp_path / "a.sqlite", num_train_users=0)
    small(tmp_path / "b.sqlite")
    with pytest.raises(DataError, match="already exists"):
        small(tmp_path / "b.sqlite")
    assert small(tmp_path / "b.sqlite", overwrite=True).is_file()
