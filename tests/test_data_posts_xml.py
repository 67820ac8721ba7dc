"""Posts.xml conversion: hand-checked cleaning on a tiny dump, and invariants on the shared Stack Exchange samples."""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET

import pytest

from fishmerge.data.posts_xml import (
    URL_TOKEN,
    clean_body,
    convert_posts_xml,
    iter_rows,
    parse_tags,
    split_of,
)
from fishmerge.data.stackoverflow import SPLITS, StackOverflowReader
from fishmerge.errors import DataError

ROWS = [
    {"Id": "1", "PostTypeId": "1", "CreationDate": "2015-01-02T10:00:00.000", "Score": "3", "OwnerUserId": "7",
     "Title": "Hello &amp; goodbye?", "Tags": "<python><web-apps>",
     "Body": '<p>Hello World! Visit <a href="http://x.com">my site</a> at https://Example.com/page.</p>\n'
             "<pre><code>secret_code()\n</code></pre><p>Caf&eacute; &amp; more?</p>"},
    {"Id": "2", "PostTypeId": "2", "ParentId": "1", "CreationDate": "2015-01-04T00:00:00.000", "Score": "-1",
     "OwnerUserId": "7", "Body": "<p>I don't know; try 3.5 <code>x</code> times.</p>"},
    {"Id": "3", "PostTypeId": "2", "ParentId": "1", "CreationDate": "2015-01-03T00:00:00.000", "Score": "0",
     "OwnerUserId": "7", "Body": "<ul><li>First item</li><li>second ITEM</li></ul>"},
    {"Id": "4", "PostTypeId": "2", "ParentId": "1", "CreationDate": "2015-01-03T00:00:00.000", "Score": "0",
     "Body": "<p>No owner here. Another sentence.</p>"},
    {"Id": "5", "PostTypeId": "5", "CreationDate": "2015-01-03T00:00:00.000", "OwnerUserId": "7",
     "Body": "<p>Tag wiki text. More text.</p>"},
    {"Id": "6", "PostTypeId": "1", "CreationDate": "2015-01-05T00:00:00.000", "Score": "1", "OwnerUserId": "8",
     "Title": "Lonely", "Tags": "<beer>", "Body": "<p>Only one sentence</p>"},
]


def write_xml(path, rows=ROWS):
    root = ET.Element("posts")
    for attrs in rows:
        ET.SubElement(root, "row", attrs)
    path.write_bytes(b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root))
    return path


def test_tiny_dump_hand_checked(tmp_path):
    out = tmp_path / "so.sqlite"
    summary = convert_posts_xml(write_xml(tmp_path / "Posts.xml"), out, min_sentences=2, split_fractions=(1, 0, 0))
    assert (summary.rows, summary.skipped_no_owner, summary.skipped_other_type) == (6, 1, 1)
    assert (summary.users_seen, summary.users_below_threshold) == (2, 1)
    assert summary.clients == {"train": 1, "heldout": 0, "test": 0}
    assert summary.examples == {"train": 6}
    question = {"title": "hello & goodbye ?", "tags": "python|web-apps", "type": "question",
                "creation_date": "2015-01-02T10:00:00.000", "score": 3}
    answer_meta = {"title": "hello & goodbye ?", "tags": "python|web-apps", "type": "answer"}
    with StackOverflowReader(out) as reader:
        assert reader.clients("train") == [("00000007", 6)]
        got = list(reader.examples("train", "00000007"))
    assert [ex["tokens"] for ex in got] == [
        "hello world !",
        f"visit my site at {URL_TOKEN} .",
        "cafe & more ?",
        "first item",  # answer 3 is older than answer 2, though later in the file
        "second item",
        "i don't know ; try 3 . 5 times .",
    ]
    assert all({k: ex[k] for k in question} == question for ex in got[:3])
    assert all({k: ex[k] for k in answer_meta} == answer_meta for ex in got[3:])
    assert [ex["score"] for ex in got[3:]] == [0, 0, -1]


def test_split_of_is_seeded_sha256():
    u = int.from_bytes(hashlib.sha256(b"3/00000042").digest()[:8], "big") / 2**64
    expected = "train" if u < 0.8 else "heldout" if u < 0.9 else "test"
    assert split_of("00000042", seed=3) == expected
    assignments = [split_of(f"{i:08d}", seed=0) for i in range(2000)]
    share = {s: assignments.count(s) / 2000 for s in SPLITS}
    assert abs(share["train"] - 0.8) < 0.04 and abs(share["test"] - 0.1) < 0.03
    assert assignments != [split_of(f"{i:08d}", seed=1) for i in range(2000)]
    assert split_of("x", fractions=(0, 0, 1)) == "test"


def test_parse_tags_both_dump_formats():
    assert parse_tags("<python><sql-server>") == "python|sql-server"
    assert parse_tags("|python|sql-server|") == "python|sql-server"
    assert parse_tags("") == ""


def test_errors(tmp_path):
    xml = write_xml(tmp_path / "Posts.xml")
    with pytest.raises(DataError, match="not found"):
        convert_posts_xml(tmp_path / "missing.xml", tmp_path / "a.sqlite")
    with pytest.raises(DataError, match="no user has at least 50"):
        convert_posts_xml(xml, tmp_path / "b.sqlite", min_sentences=50)
    assert not (tmp_path / "b.sqlite").exists()
    assert not list(tmp_path.glob("*.staging"))
    with pytest.raises(DataError, match="split_fractions"):
        convert_posts_xml(xml, tmp_path / "c.sqlite", split_fractions=(0.5, 0.1, 0.1))
    existing = tmp_path / "d.sqlite"
    existing.write_bytes(b"")
    with pytest.raises(DataError, match="already exists"):
        convert_posts_xml(xml, existing)
    broken = tmp_path / "broken.xml"
    broken.write_text('<posts><row Id="1" Body="x" OwnerUserId="1"></posts>')
    with pytest.raises(DataError, match="not well-formed") as excinfo:
        list(iter_rows(broken))
    assert "\n" not in str(excinfo.value)
    empty = tmp_path / "empty.xml"
    empty.write_text("<posts></posts>")
    with pytest.raises(DataError, match="no <row/>"):
        convert_posts_xml(empty, tmp_path / "e.sqlite")


CLEAN_TOKEN = re.compile(r"^(<URL>|[a-z0-9]+('[a-z0-9]+)*|[\x21-\x7e])$")


@pytest.mark.parametrize("site", ["ai", "beer", "matheducators"])
def test_sample_bodies_clean_to_tff_tokens(stackexchange_dir, site):
    sentences = [s for row in iter_rows(stackexchange_dir / f"{site}.Posts.xml") for s in clean_body(row.get("Body", ""))]
    assert len(sentences) > 1000
    for sentence in sentences:
        assert sentence.isascii(), sentence
        without_urls = sentence.replace(URL_TOKEN, "")
        assert without_urls == without_urls.lower(), sentence
        assert all(CLEAN_TOKEN.match(t) for t in sentence.split(" ")), sentence
        assert ": / /" not in sentence and "www ." not in sentence, sentence  # every URL became <URL>
        assert "&" + "amp ;" not in sentence and "& quot ;" not in sentence, sentence  # entities unescaped
        assert not re.search(r"< ?/? ?(p|a|code|pre|li|br|strong|em) ?>", sentence), sentence
    assert sum(URL_TOKEN in s for s in sentences) > 0


def test_sample_conversion_counts_consistent(stackexchange_dir, tmp_path):
    path = tmp_path / "ai.sqlite"
    summary = convert_posts_xml(stackexchange_dir / "ai.Posts.xml", path, min_sentences=10)
    assert summary.rows == 1279
    assert summary.users_seen == summary.users_below_threshold + sum(summary.clients.values())
    with StackOverflowReader(path) as reader:
        assert reader.split_sizes() == {s: n for s, n in summary.clients.items() if n}
        for split in SPLITS:
            clients = reader.clients(split)
            assert all(n >= 10 for _, n in clients)
            assert sum(n for _, n in clients) == summary.examples[split]
            for client_id, n in clients[:5]:
                examples = list(reader.examples(split, client_id))
                assert len(examples) == n
                dates = [ex["creation_date"] for ex in examples]
                assert dates == sorted(dates)
                assert {ex["type"] for ex in examples} <= {"question", "answer"}
        placed = [(cid, split) for split in SPLITS for cid, _ in reader.clients(split)]
    assert len({cid for cid, _ in placed}) == len(placed)  # a user is in exactly one split
    assert all(split_of(cid, seed=0) == split for cid, split in placed)
    assert all(re.fullmatch(r"\d{8}", cid) for cid, _ in placed)
