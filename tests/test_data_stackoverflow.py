"""TFF stackoverflow.sqlite: writer/reader round trip, stored order, schema checks, vocabulary ranking."""

from __future__ import annotations

import hashlib
import sqlite3
from collections import Counter

import pytest

from fishmerge.data.stackoverflow import (
    ClientInfo,
    StackOverflowReader,
    StackOverflowWriter,
    build_vocab,
    decode_stackoverflow_example,
    encode_stackoverflow_example,
    top_words,
)
from fishmerge.data.tokenizer import build_word_level_tokenizer, encode_sentences
from fishmerge.errors import DataError


def example(tokens: str, score: int = 0, kind: str = "question") -> dict:
    return {"tokens": tokens, "title": "a title", "tags": "python|sql", "type": kind,
            "creation_date": "2015-01-01T00:00:00.000", "score": score}


CLIENTS = {
    ("train", "00000002"): [example("b b a .", 3), example("c ?", -2, "answer")],
    ("train", "00000001"): [example("a a a b ."), example("zeta"), example("a b")],
    ("heldout", "00000003"): [example("heldout words only .", 7)],
}


def write(path, clients=CLIENTS):
    with StackOverflowWriter(path) as writer:
        for (split, client_id), examples in clients.items():
            writer.add_client(split, client_id, examples)
    return path


def test_example_round_trip_and_defaults():
    ex = example("hello world .", score=-5)
    assert decode_stackoverflow_example(encode_stackoverflow_example(ex)) == ex
    assert decode_stackoverflow_example(encode_stackoverflow_example({"tokens": "x"})) == {
        "tokens": "x", "title": "", "tags": "", "type": "", "creation_date": "", "score": 0}
    with pytest.raises(DataError, match="unknown"):
        encode_stackoverflow_example({"body": "x"})
    with pytest.raises(DataError, match="score"):
        encode_stackoverflow_example({"score": "3"})


def test_writer_reader_round_trip_in_stored_order(tmp_path):
    path = write(tmp_path / "so.sqlite")
    with StackOverflowReader(path) as reader:
        assert reader.split_sizes() == {"heldout": 1, "train": 2}
        assert reader.clients("train") == [ClientInfo("00000001", 3), ClientInfo("00000002", 2)]
        for (split, client_id), examples in CLIENTS.items():
            assert list(reader.examples(split, client_id)) == examples
        streamed = [(cid, ex["tokens"]) for cid, ex in reader.iter_split("train")]
    assert streamed == [("00000002", "b b a ."), ("00000002", "c ?"),
                        ("00000001", "a a a b ."), ("00000001", "zeta"), ("00000001", "a b")]
    with sqlite3.connect(path) as conn:  # the raw schema is TFF's
        columns = [row[1] for row in conn.execute("PRAGMA table_info(examples)")]
        assert columns == ["split_name", "client_id", "serialized_example_proto"]
        assert conn.execute("SELECT SUM(num_examples) FROM client_metadata").fetchone()[0] == 6


def test_identical_writes_are_byte_identical(tmp_path):
    a = write(tmp_path / "a.sqlite").read_bytes()
    b = write(tmp_path / "b.sqlite").read_bytes()
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()


def test_writer_refusals_and_abort(tmp_path):
    path = write(tmp_path / "so.sqlite")
    with pytest.raises(DataError, match="already exists"):
        StackOverflowWriter(path)
    out = tmp_path / "new.sqlite"
    with pytest.raises(DataError, match="already written"):
        with StackOverflowWriter(out) as writer:
            writer.add_client("train", "1", [example("a")])
            writer.add_client("train", "1", [example("b")])
    assert not out.exists() and not (tmp_path / "new.sqlite.partial").exists()
    with StackOverflowWriter(out) as writer:
        with pytest.raises(DataError, match="no examples"):
            writer.add_client("train", "1", [])
        writer.add_client("train", "1", [example("a")])
    with StackOverflowWriter(out, overwrite=True) as writer:
        writer.add_client("test", "9", [example("z")])
    with StackOverflowReader(out) as reader:
        assert reader.split_sizes() == {"test": 1}


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        StackOverflowReader(tmp_path / "missing.sqlite")
    text = tmp_path / "notes.sqlite"
    text.write_text("this is not a database " * 100)
    with pytest.raises(DataError, match="not a SQLite database"):
        StackOverflowReader(text)
    empty = tmp_path / "empty.sqlite"
    with sqlite3.connect(empty) as conn:
        conn.execute("CREATE TABLE other (x)")
    with pytest.raises(DataError, match="no table 'examples'"):
        StackOverflowReader(empty)
    partial = tmp_path / "partial.sqlite"
    with sqlite3.connect(partial) as conn:
        conn.execute("CREATE TABLE examples (split_name, client_id)")
        conn.execute("CREATE TABLE client_metadata (client_id, split_name, num_examples)")
    with pytest.raises(DataError, match="serialized_example_proto"):
        StackOverflowReader(partial)
    with StackOverflowReader(write(tmp_path / "so.sqlite")) as reader:
        with pytest.raises(DataError, match="split 'test'.*no clients") as excinfo:
            reader.clients("test")
        assert "\n" not in str(excinfo.value)
        with pytest.raises(DataError, match="has no examples"):
            reader.iter_split("test")
        with pytest.raises(DataError, match="client 'nobody'"):
            reader.examples("train", "nobody")


def test_vocabulary_ties_break_by_word_order(tmp_path):
    # train counts: a 6, b 4, . 2, c 1, ? 1, zeta 1 (heldout words must not count)
    path = write(tmp_path / "so.sqlite")
    assert build_vocab(path, vocab_size=4) == ["a", "b", ".", "?"]
    assert build_vocab(path, vocab_size=100) == ["a", "b", ".", "?", "c", "zeta"]
    assert top_words(Counter({"y": 2, "x": 2, "z": 3}), 2) == ["z", "x"]
    with pytest.raises(DataError, match="vocab_size"):
        top_words(Counter({"a": 1}), 0)
    with pytest.raises(DataError, match="no words"):
        top_words(Counter(), 5)


def test_file_to_tensors(tmp_path):
    path = write(tmp_path / "so.sqlite")
    tok = build_word_level_tokenizer(build_vocab(path, vocab_size=3))  # a 1, b 2, . 3; OOV 4, BOS 5, EOS 6
    with StackOverflowReader(path) as reader:
        sentences = [str(ex["tokens"]) for ex in reader.examples("train", "00000002")]
    x, y = encode_sentences(tok, sentences)
    assert x[:, :5].tolist() == [[5, 2, 2, 1, 3], [5, 4, 4, 0, 0]]
    assert y[:, :5].tolist() == [[2, 2, 1, 3, 6], [4, 4, 6, 0, 0]]
