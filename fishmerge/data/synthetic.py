"""Seeded synthetic Stack-Overflow-like users, written in TFF's Stack Overflow schema; no downloads.

Text comes from a small built-in grammar: shared sentence templates with slots (``{n}`` noun, ``{v}`` verb,
``{a}`` adjective) filled from one topic's word lists, plus topic-neutral filler shared by everybody. Every
topic has its own nouns, verbs and adjectives (topic nouns are exclusive to their topic). Sentences are
already in TFF's token form: lower case, punctuation as separate tokens, single spaces.

Users differ in what they write about and in how they write it, so a personalized model has something to
find that the global model cannot:

* topic mix: a Dirichlet(0.3) draw over :data:`TOPICS` (most users focus on one or two topics);
* phrasing: a Dirichlet(0.5) preference over templates, a Dirichlet(0.5) preference over each topic's
  words, a favourite opener (``so ,`` / ``hi ,`` / ...) used at a personal rate, and a personal rate and
  choice of filler sentences.

Each user writes posts (question or answer, one topic each, 1-4 sentences, one example per sentence) with
a title, tags ``<topic>|<noun>``, increasing creation dates and a score. Everything is drawn from
``numpy.random.default_rng([seed, stream, index])``, so the same seed gives byte-identical files and a
user's text does not depend on how many other users are generated.

Splits: train, heldout and test users are distinct (client ids ``00000000``.. numbered in that order),
like TFF's train and heldout splits; TFF's test split instead holds later posts of users who may also be in
train. Personalization (SPEC §4) splits each evaluation client's examples chronologically, which the
increasing dates support.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Union

import numpy as np

from fishmerge.data.stackoverflow import StackOverflowWriter
from fishmerge.errors import DataError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_TOPIC_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "python": {
        "n": ("dataframe", "list", "dictionary", "decorator", "generator", "virtualenv", "module", "traceback",
              "iterator", "tuple", "lambda", "pip", "numpy", "pandas", "import", "string", "loop", "class"),
        "v": ("import", "iterate", "append", "install", "refactor", "pickle", "slice", "sort", "call", "debug"),
        "a": ("pythonic", "mutable", "immutable", "nested", "lazy", "slow", "recursive"),
    },
    "databases": {
        "n": ("query", "index", "table", "join", "transaction", "schema", "postgres", "mysql", "sqlite",
              "column", "row", "cursor", "deadlock", "migration", "primary", "foreign", "replica", "view"),
        "v": ("select", "insert", "normalize", "migrate", "lock", "commit", "rollback", "group", "query", "backup"),
        "a": ("relational", "indexed", "duplicate", "atomic", "consistent", "stale", "null"),
    },
    "web": {
        "n": ("browser", "css", "javascript", "html", "request", "cookie", "server", "endpoint", "header",
              "session", "form", "button", "page", "react", "redirect", "cache", "url", "template"),
        "v": ("render", "submit", "fetch", "redirect", "style", "deploy", "proxy", "click", "load", "serve"),
        "a": ("responsive", "asynchronous", "cached", "secure", "blank", "broken", "minified"),
    },
    "statistics": {
        "n": ("regression", "variance", "sample", "distribution", "hypothesis", "estimator", "likelihood",
              "prior", "posterior", "outlier", "correlation", "residual", "quantile", "mean", "median",
              "bootstrap", "confidence", "covariate"),
        "v": ("estimate", "fit", "resample", "test", "bin", "standardize", "weight", "simulate", "plot", "reject"),
        "a": ("significant", "biased", "unbiased", "normal", "skewed", "bayesian", "robust"),
    },
    "cooking": {
        "n": ("dough", "oven", "pan", "butter", "garlic", "onion", "sauce", "flour", "yeast", "knife",
              "recipe", "steak", "broth", "egg", "salt", "pepper", "skillet", "crust"),
        "v": ("bake", "fry", "simmer", "knead", "season", "chop", "roast", "whisk", "marinate", "boil"),
        "a": ("crispy", "tender", "soggy", "salty", "fluffy", "burnt", "spicy"),
    },
    "gardening": {
        "n": ("tomato", "soil", "compost", "seedling", "mulch", "root", "leaf", "fertilizer", "pot", "lawn",
              "rose", "aphid", "shrub", "bulb", "hedge", "watering", "greenhouse", "weed"),
        "v": ("prune", "plant", "water", "repot", "fertilize", "transplant", "harvest", "mow", "sow", "dig"),
        "a": ("yellow", "wilted", "shady", "sandy", "overwatered", "hardy", "perennial"),
    },
}
TOPICS: tuple[str, ...] = tuple(_TOPIC_WORDS)

_GENERAL_WORDS: dict[str, tuple[str, ...]] = {
    "n": ("problem", "question", "answer", "idea", "example", "thing", "result", "way", "step", "reason",
          "detail", "approach", "option", "case", "part"),
    "v": ("check", "change", "fix", "find", "use", "try", "explain", "understand", "compare", "avoid"),
    "a": ("simple", "good", "wrong", "strange", "different", "easy", "hard", "better", "common"),
}

_TEMPLATES: tuple[str, ...] = (
    "how do i {v} the {n} ?",
    "i am trying to {v} a {n} with the {n2} .",
    "the {n} is {a} when i {v} it .",
    "is there a {a} way to {v} the {n} ?",
    "you can {v} the {n} before the {n2} .",
    "my {n} keeps getting {a} after i {v} the {n2} .",
    "what is the difference between a {n} and a {n2} ?",
    "it depends on the {n} , but usually you {v} it first .",
    "i would {v} the {n} and then check the {n2} .",
    "why does my {n} become {a} ?",
    "try to {v} a {a} {n} instead .",
    "the problem is that the {n} does not {v} .",
    "have you tried to {v} the {n2} ?",
    "a {a} {n} is better than a {a2} {n2} .",
    "i don't understand how the {n} works with the {n2} .",
    "this {n} should {v} without any {n2} .",
    "when should i {v} the {n} ( and the {n2} ) ?",
    "in my experience the {n} gets {a} if you {v} too often .",
)
_TITLES: tuple[str, ...] = (
    "how to {v} a {n} ?",
    "{n} is {a} after {n2}",
    "why is my {n} {a} ?",
    "best way to {v} {n} with {n2}",
    "{v} the {n} or the {n2} ?",
)
_FILLER: tuple[str, ...] = (
    "thanks in advance .",
    "any help would be appreciated .",
    "i have been stuck on this for a while .",
    "edit : i found the answer myself .",
    "hope this helps .",
    "let me know if you need more details .",
    "does anyone know why ?",
    "this is my first question here .",
    "i searched but could not find anything useful .",
    "i hope that makes sense .",
    "as far as i know , there is no simple answer .",
    "it worked for me .",
    "see the comment above .",
    "that is a good question .",
    "sorry for my english .",
    "update : it still does not work .",
    "good luck !",
    "i'm not sure this is the right place to ask .",
)
_OPENERS: tuple[str, ...] = ("so ,", "hi ,", "well ,", "ok so", "honestly ,", "basically ,", "in short ,", "hmm ,")

_STREAM_USERS, _STREAM_GENERAL, _STREAM_TOPIC = 1, 2, 3
_TOPIC_ALPHA, _STYLE_ALPHA = 0.3, 0.5
_EPOCH = datetime(2012, 1, 1)


def _draw(rng: np.random.Generator, n: int, cdf: np.ndarray | None = None) -> int:
    # Inverse-CDF draw: ~10x faster than Generator.choice(p=...) per call, and just as seeded.
    if cdf is None:
        return int(rng.integers(n))
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), n - 1)


def _fill(template: str, words: dict[str, tuple[str, ...]], rng: np.random.Generator,
          cdfs: dict[str, np.ndarray] | None = None) -> str:
    def pick(kind: str) -> str:
        return words[kind][_draw(rng, len(words[kind]), None if cdfs is None else cdfs[kind])]

    slots = {"n": pick("n"), "n2": pick("n"), "v": pick("v"), "a": pick("a"), "a2": pick("a")}
    return template.format(**slots)


def topic_vocabulary(topic: str) -> frozenset[str]:
    """The nouns, verbs and adjectives of one topic (its nouns appear in no other topic).

    Raises:
        DataError: ``topic`` is not one of :data:`TOPICS`.
    """
    if topic not in _TOPIC_WORDS:
        raise DataError(f"unknown topic {topic!r}; choose one of {TOPICS}")
    return frozenset(w for words in _TOPIC_WORDS[topic].values() for w in words)


def topic_sentences(topic: str, n: int, seed: int) -> list[str]:
    """``n`` sentences about one topic with uniform phrasing (for central pretraining or probes).

    Raises:
        DataError: ``topic`` is unknown, or ``n`` or ``seed`` negative.
    """
    topic_vocabulary(topic)
    _check_count(n)
    _check_seed(seed)
    rng = np.random.default_rng([seed, _STREAM_TOPIC, TOPICS.index(topic)])
    return [_fill(_TEMPLATES[_draw(rng, len(_TEMPLATES))], _TOPIC_WORDS[topic], rng) for _ in range(n)]


def general_sentences(n: int, seed: int) -> list[str]:
    """``n`` topic-neutral sentences: filler, general-word templates, and a light mix of all topics.

    Raises:
        DataError: ``n`` or ``seed`` is negative.
    """
    _check_count(n)
    _check_seed(seed)
    rng = np.random.default_rng([seed, _STREAM_GENERAL])
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.4:
            out.append(_FILLER[_draw(rng, len(_FILLER))])
        else:
            words = _GENERAL_WORDS if u < 0.75 else _TOPIC_WORDS[TOPICS[_draw(rng, len(TOPICS))]]
            out.append(_fill(_TEMPLATES[_draw(rng, len(_TEMPLATES))], words, rng))
    return out


def _check_seed(seed: int) -> None:
    # numpy seed sequences take non-negative integers only.
    if seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}; pass seed >= 0")


def _check_count(n: int) -> None:
    if n < 0:
        raise DataError(f"the number of sentences must be non-negative, got {n}; pass n >= 0")


@dataclass
class SyntheticUser:
    """One synthetic user's tastes; :meth:`examples` writes their sentences."""

    index: int
    seed: int
    topic_mix: np.ndarray
    template_probs: np.ndarray
    word_probs: dict[str, dict[str, np.ndarray]]
    opener: str
    opener_rate: float
    filler_rate: float
    filler_probs: np.ndarray
    question_rate: float

    @property
    def client_id(self) -> str:
        """TFF-style zero-padded id."""
        return f"{self.index:08d}"

    def examples(self, n: int) -> list[dict[str, str | int]]:
        """``n`` sentences as Stack Overflow examples (posts of 1-4 sentences, dates increasing)."""
        _check_count(n)
        rng = np.random.default_rng([self.seed, _STREAM_USERS, self.index, 1])
        date = _EPOCH + timedelta(days=float(rng.uniform(0, 1500)))
        out: list[dict[str, str | int]] = []
        topic_cdf, template_cdf = np.cumsum(self.topic_mix), np.cumsum(self.template_probs)
        filler_cdf = np.cumsum(self.filler_probs)
        word_cdfs = {t: {k: np.cumsum(p) for k, p in kinds.items()} for t, kinds in self.word_probs.items()}
        while len(out) < n:
            topic = TOPICS[_draw(rng, len(TOPICS), topic_cdf)]
            words, cdfs = _TOPIC_WORDS[topic], word_cdfs[topic]
            kind = "question" if rng.random() < self.question_rate else "answer"
            title = _fill(_TITLES[_draw(rng, len(_TITLES))], words, rng, cdfs)
            tags = f"{topic}|{words['n'][_draw(rng, len(words['n']), cdfs['n'])]}"
            score = int(rng.geometric(0.3)) - 2
            date += timedelta(hours=float(rng.exponential(72.0)))
            meta = {"title": title, "tags": tags, "type": kind, "creation_date": date.strftime("%Y-%m-%dT%H:%M:%S.000"), "score": score}
            for _ in range(min(int(rng.integers(1, 5)), n - len(out))):
                if rng.random() < self.filler_rate:
                    sentence = _FILLER[_draw(rng, len(_FILLER), filler_cdf)]
                else:
                    sentence = _fill(_TEMPLATES[_draw(rng, len(_TEMPLATES), template_cdf)], words, rng, cdfs)
                if rng.random() < self.opener_rate:
                    sentence = f"{self.opener} {sentence}"
                out.append({"tokens": sentence, **meta})
        return out


def synthetic_user(index: int, seed: int = 0) -> SyntheticUser:
    """User ``index`` of the population drawn with ``seed`` (independent of how many users are drawn).

    Raises:
        DataError: ``index`` or ``seed`` is negative.
    """
    _check_seed(seed)
    if index < 0:
        raise DataError(f"user index must be non-negative, got {index}; pass index >= 0")
    rng = np.random.default_rng([seed, _STREAM_USERS, index, 0])
    word_probs = {
        topic: {kind: rng.dirichlet(np.full(len(ws), _STYLE_ALPHA)) for kind, ws in kinds.items()}
        for topic, kinds in _TOPIC_WORDS.items()
    }
    return SyntheticUser(
        index=index,
        seed=seed,
        topic_mix=rng.dirichlet(np.full(len(TOPICS), _TOPIC_ALPHA)),
        template_probs=rng.dirichlet(np.full(len(_TEMPLATES), _STYLE_ALPHA)),
        word_probs=word_probs,
        opener=_OPENERS[rng.integers(len(_OPENERS))],
        opener_rate=float(rng.uniform(0.0, 0.5)),
        filler_rate=float(rng.uniform(0.05, 0.3)),
        filler_probs=rng.dirichlet(np.full(len(_FILLER), _STYLE_ALPHA)),
        question_rate=float(rng.uniform(0.2, 0.8)),
    )


def write_synthetic_stackoverflow(
    path: PathLike,
    *,
    num_train_users: int = 100,
    num_heldout_users: int = 20,
    num_test_users: int = 20,
    sentences_per_user: tuple[int, int] = (20, 60),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic ``stackoverflow.sqlite`` with distinct train, heldout and test users.

    Args:
        path: Output SQLite file (TFF schema).
        num_train_users: Users in ``train`` (client ids ``00000000`` onwards).
        num_heldout_users: Users in ``heldout`` (the next ids).
        num_test_users: Users in ``test`` (the next ids).
        sentences_per_user: Inclusive (min, max) range; each user's count is drawn uniformly.
        seed: Same seed, same bytes.
        overwrite: Replace an existing file.

    Returns:
        ``path``.

    Raises:
        DataError: Bad counts or range, no train users, or ``path`` exists without ``overwrite``.
    """
    low, high = sentences_per_user
    if low < 1 or high < low:
        raise DataError(f"sentences_per_user must be (min, max) with 1 <= min <= max, got {sentences_per_user}; e.g. (20, 60)")
    _check_seed(seed)
    if num_train_users < 1 or num_heldout_users < 0 or num_test_users < 0:
        raise DataError("need at least one train user and non-negative heldout/test counts; raise num_train_users")
    sizes = {"train": num_train_users, "heldout": num_heldout_users, "test": num_test_users}
    index = 0
    with StackOverflowWriter(path, overwrite=overwrite) as writer:
        for split, size in sizes.items():
            for _ in range(size):
                user = synthetic_user(index, seed)
                count = int(np.random.default_rng([seed, _STREAM_USERS, index, 2]).integers(low, high + 1))
                writer.add_client(split, user.client_id, user.examples(count))
                index += 1
    logger.info("wrote %d synthetic users to %s", index, path)
    return Path(path)
