"""Stack Exchange data-dump ``Posts.xml`` to per-user clients in TFF's Stack Overflow schema.

The dump holds one ``<row .../>`` per post with an HTML ``Body``, ``OwnerUserId``, ``CreationDate``,
``Score``, ``PostTypeId`` (1 question, 2 answer) and, for questions, ``Title`` and ``Tags``. TFF's Stack
Overflow dataset was built from the same dump; :func:`convert_posts_xml` reproduces its cleaning as we
understand it and writes a file that :class:`~fishmerge.data.stackoverflow.StackOverflowReader` reads.

Cleaning (:func:`clean_body`), our rules where TFF does not publish them:

1. ``<pre>`` and ``<code>`` blocks are dropped with their content (inline code too);
2. block-level tags (``p``, ``br``, ``li``, headings, ...) end a sentence; other tags are removed,
   keeping their text (a link keeps its text, its ``href`` is lost);
3. HTML entities are unescaped, text is NFKD-normalized and reduced to ASCII (accents dropped), lower-cased;
4. URLs (``http://``, ``https://``, ``ftp://``, ``www.``) become the token ``<URL>``;
5. sentences end at line breaks and after ``.``, ``!`` or ``?`` followed by whitespace;
6. tokens are runs of letters/digits, keeping inner apostrophes (``don't``), and every other character is
   a token of its own (``3.5`` gives ``3 . 5``); a sentence without any word or ``<URL>`` is dropped.

One example per sentence. Answers carry their question's title and tags when the question came earlier
in the file (dumps are in ``Id`` order, so it usually does). Rows without ``OwnerUserId`` and post types
other than questions and answers are skipped. Client ids are the owner ids, zero-padded to 8 digits like
TFF's, after an optional prefix (to keep sites apart). A client's examples are in chronological order
(``CreationDate``, then file order). Users with fewer than ``min_sentences`` sentences are dropped.

Splits are by user, as in TFF's train/heldout split: a user goes to train, heldout or test by
``sha256(f"{seed}/{client_id}")`` read as a number in [0, 1) against ``split_fractions``, so the assignment
is seeded, stable across runs and Python versions (never the salted ``hash()``), and does not depend on
the other users. (TFF's test split instead holds posts after 2018-01-01; a dump sample has no such
date boundary.)

Parsing streams with ``xml.etree.ElementTree.iterparse``; sentences are staged in a temporary SQLite file
beside the output, so memory holds only question titles/tags, not the posts.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import re
import sqlite3
import tempfile
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from fishmerge.data.stackoverflow import (
    SPLITS,
    StackOverflowWriter,
    encode_stackoverflow_example,
)
from fishmerge.errors import DataError, one_line

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
URL_TOKEN = "<URL>"
DEFAULT_MIN_SENTENCES = 10
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

_CODE_BLOCK = re.compile(r"<(pre|code)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_BLOCK_TAG = re.compile(
    r"</?(?:p|br|li|ul|ol|h[1-6]|div|blockquote|hr|tr|td|th|table|dd|dt|dl)\b[^>]*>", re.IGNORECASE
)
_ANY_TAG = re.compile(r"<[^>]*>")
_URL = re.compile(r"(?:(?:https?|ftp)://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]}]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TOKEN = re.compile(rf"{re.escape(URL_TOKEN)}|[a-z0-9]+(?:'[a-z0-9]+)*|[^\sa-z0-9]")
_WORD = re.compile(rf"{re.escape(URL_TOKEN)}|[a-z0-9]")
_POST_TYPES = {"1": "question", "2": "answer"}


# ------------------------------------------------------------------------------------------------ cleaning
def _plain_text(text: str) -> str:
    """Unescaped, ASCII, lower-cased text with URLs replaced; newlines kept as sentence breaks."""
    text = html.unescape(text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    return _URL.sub(f" {URL_TOKEN} ", text)


def tokenize_sentences(text: str) -> list[str]:
    """Split plain text (already unescaped, ASCII, lower-cased) into sentences of space-joined tokens."""
    sentences = []
    for line in text.splitlines():
        for piece in _SENTENCE_END.split(line):
            tokens = _TOKEN.findall(piece)
            if any(_WORD.match(token) for token in tokens):
                sentences.append(" ".join(tokens))
    return sentences


def clean_body(body_html: str) -> list[str]:
    """A post's HTML body to its TFF-style sentences (see the module docstring for the rules)."""
    text = _CODE_BLOCK.sub(" ", body_html)
    text = _BLOCK_TAG.sub("\n", text)
    text = _ANY_TAG.sub(" ", text)
    return tokenize_sentences(_plain_text(text))


def clean_title(title: str) -> str:
    """A question title cleaned like a body, as one token string."""
    return " ".join(tokenize_sentences(_plain_text(title).replace("\n", " ")))


def parse_tags(tags: str) -> str:
    """``<python><sql>`` (older dumps) or ``|python|sql|`` (newer dumps) to ``python|sql``."""
    names = re.findall(r"<([^<>]+)>", tags) if "<" in tags else tags.split("|")
    return "|".join(name for name in names if name)


# ------------------------------------------------------------------------------------------------ splitting
def split_of(client_id: str, *, seed: int = 0, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS) -> str:
    """The split (``train``/``heldout``/``test``) of a user: seeded, stable, independent of other users."""
    digest = hashlib.sha256(f"{seed}/{client_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    total = 0.0
    for split, fraction in zip(SPLITS, fractions):
        total += fraction
        if u < total:
            return split
    return SPLITS[len(fractions) - 1]


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise DataError(f"split_fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}; e.g. (0.8, 0.1, 0.1)")


# ------------------------------------------------------------------------------------------------ parsing
@dataclass
class PostsConversion:
    """What :func:`convert_posts_xml` read and wrote."""

    path: Path
    rows: int = 0
    skipped_no_owner: int = 0
    skipped_other_type: int = 0
    users_seen: int = 0
    users_below_threshold: int = 0
    clients: dict[str, int] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)


def iter_rows(xml_path: PathLike) -> Iterator[dict[str, str]]:
    """Stream the attributes of each ``<row/>`` of a ``Posts.xml``, freeing parsed elements as it goes.

    Raises:
        DataError: The file is missing or is not well-formed XML.
    """
    path = Path(xml_path)
    if not path.is_file():
        raise DataError(f"Posts.xml not found: {path}; pass a Stack Exchange data-dump Posts.xml file")
    root = None
    try:
        for event, elem in ET.iterparse(path, events=("start", "end")):
            if event == "start":
                root = elem if root is None else root
                continue
            if elem.tag == "row":
                yield dict(elem.attrib)
                # Without clearing, iterparse keeps every row attached to the root: memory would grow with the dump.
                elem.clear()
                if root is not None:
                    root.clear()
    except ET.ParseError as exc:
        raise DataError(f"{path} is not well-formed XML ({one_line(str(exc))}); pass an unmodified Posts.xml") from None


def _client_id(owner: str, prefix: str) -> str:
    return prefix + (owner.zfill(8) if owner.isdigit() else owner)


def _stage(xml_path: PathLike, conn: sqlite3.Connection, summary: PostsConversion, prefix: str) -> None:
    questions: dict[str, tuple[str, str]] = {}
    seq = 0
    for row in iter_rows(xml_path):
        summary.rows += 1
        kind = _POST_TYPES.get(row.get("PostTypeId", ""))
        if kind is None:
            summary.skipped_other_type += 1
            continue
        if kind == "question":
            meta = (clean_title(row.get("Title", "")), parse_tags(row.get("Tags", "")))
            questions[row.get("Id", "")] = meta
        else:
            meta = questions.get(row.get("ParentId", ""), ("", ""))
        owner = row.get("OwnerUserId", "").strip()
        if not owner:
            summary.skipped_no_owner += 1
            continue
        try:
            score = int(row.get("Score", "0"))
        except ValueError:
            score = 0
        date = row.get("CreationDate", "")
        client_id = _client_id(owner, prefix)
        for sentence in clean_body(row.get("Body", "")):
            blob = encode_stackoverflow_example(
                {"tokens": sentence, "title": meta[0], "tags": meta[1], "type": kind, "creation_date": date, "score": score}
            )
            conn.execute("INSERT INTO staged VALUES (?, ?, ?, ?)", (client_id, date, seq, blob))
            seq += 1
    if summary.rows == 0:
        raise DataError(f"{xml_path} holds no <row/> elements; pass a Stack Exchange Posts.xml")


def convert_posts_xml(
    xml_path: PathLike,
    output: PathLike,
    *,
    min_sentences: int = DEFAULT_MIN_SENTENCES,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    client_prefix: str = "",
    overwrite: bool = False,
) -> PostsConversion:
    """Convert a Stack Exchange ``Posts.xml`` into a TFF-schema ``stackoverflow.sqlite``.

    Args:
        xml_path: The dump's ``Posts.xml``.
        output: The SQLite file to write (tables ``examples`` and ``client_metadata``).
        min_sentences: Users with fewer cleaned sentences are dropped.
        split_fractions: Train/heldout/test fractions of users (see :func:`split_of`).
        seed: Seeds the user-to-split assignment.
        client_prefix: Prepended to every client id (e.g. ``"beer/"``) to keep several sites apart.
        overwrite: Replace an existing ``output``.

    Returns:
        Counts of rows read and skipped, users kept and dropped, clients and examples per split.

    Raises:
        DataError: Missing or malformed XML, an existing output, bad fractions, or no user above the threshold.
    """
    _check_fractions(split_fractions)
    if min_sentences < 1:
        raise DataError(f"min_sentences must be at least 1, got {min_sentences}; pass a positive threshold")
    out = Path(output)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass overwrite=True or choose another output path")
    if not Path(xml_path).is_file():
        raise DataError(f"Posts.xml not found: {xml_path}; pass a Stack Exchange data-dump Posts.xml file")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = PostsConversion(path=out)
    fd, staging = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent)
    os.close(fd)
    conn = sqlite3.connect(staging)
    try:
        conn.execute("CREATE TABLE staged (client_id TEXT, creation_date TEXT, seq INTEGER, blob BLOB)")
        _stage(xml_path, conn, summary, client_prefix)
        conn.execute("CREATE INDEX staged_client ON staged (client_id, creation_date, seq)")
        _write_clients(conn, out, summary, min_sentences, split_fractions, seed, overwrite)
    finally:
        conn.close()
        Path(staging).unlink(missing_ok=True)
    logger.info("converted %s: %d rows, clients %s, examples %s", xml_path, summary.rows, summary.clients, summary.examples)
    return summary


def _write_clients(
    conn: sqlite3.Connection,
    out: Path,
    summary: PostsConversion,
    min_sentences: int,
    fractions: Sequence[float],
    seed: int,
    overwrite: bool,
) -> None:
    counts = conn.execute("SELECT client_id, COUNT(*) FROM staged GROUP BY client_id ORDER BY client_id").fetchall()
    summary.users_seen = len(counts)
    kept = [cid for cid, n in counts if n >= min_sentences]
    summary.users_below_threshold = len(counts) - len(kept)
    if not kept:
        raise DataError(
            f"no user has at least {min_sentences} sentences ({len(counts)} users seen); lower min_sentences"
        )
    by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
    for cid in kept:
        by_split[split_of(cid, seed=seed, fractions=fractions)].append(cid)
    with StackOverflowWriter(out, overwrite=overwrite) as writer:
        for split in SPLITS:
            for cid in by_split[split]:
                rows = conn.execute(
                    "SELECT blob FROM staged WHERE client_id = ? ORDER BY creation_date, seq", (cid,)
                )
                n = writer.add_serialized_client(split, cid, (blob for (blob,) in rows))
                summary.examples[split] = summary.examples.get(split, 0) + n
            summary.clients[split] = len(by_split[split])
    empty = [split for split in SPLITS if not by_split[split]]
    if empty:
        logger.warning("split(s) %s got no users; use more data or a lower min_sentences", empty)
