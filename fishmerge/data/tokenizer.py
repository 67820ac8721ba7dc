"""The Stack Overflow word-level task as a real Hugging Face tokenizer.

TFF's word-level next-word task (Reddi et al. 2021, "Adaptive Federated Optimization"; TFF
``tff.simulation.baselines.stackoverflow``) maps a sentence of space-separated tokens to ids::

    PAD 0, vocabulary words 1..V (most frequent first), one OOV bucket V+1, BOS V+2, EOS V+3

cuts it to its first ``max_words`` (20) words, appends EOS only if fewer than ``max_words`` words remain,
prepends BOS, and trains on ``x = seq[:-1]``, ``y = seq[1:]``, both padded with PAD to ``max_words``.

:func:`build_word_level_tokenizer` builds this with the ``tokenizers`` library (``WordLevel`` model with the
OOV token as ``unk``, ``WhitespaceSplit`` pre-tokenizer, a ``TemplateProcessing`` post-processor that adds
BOS) wrapped in ``transformers.PreTrainedTokenizerFast``, so it saves with ``save_pretrained`` and loads with
``AutoTokenizer.from_pretrained``. ``WhitespaceSplit`` rather than ``Whitespace``: the latter would cut
``<URL>`` and ``don't`` into pieces, while TFF's tokens are already split and only need splitting on spaces.

The conditional EOS cannot be expressed by a post-processor template (a template adds its tokens always), so
it lives in :func:`encode_sentence` / :func:`encode_sentences`: tokenize with truncation to
``max_words + 1`` ids (BOS plus at most ``max_words`` words), then append EOS when fewer than
``max_words`` words survived. Calling the tokenizer directly gives BOS + words, without EOS, like a causal LM
prompt. Special tokens are spelled in upper case (``<PAD>``, ``<OOV>``, ``<BOS>``, ``<EOS>``) so they cannot
collide with TFF's lower-cased words.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fishmerge.errors import DataError

logger = logging.getLogger(__name__)

PAD_TOKEN = "<PAD>"
OOV_TOKEN = "<OOV>"
BOS_TOKEN = "<BOS>"
EOS_TOKEN = "<EOS>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, OOV_TOKEN, BOS_TOKEN, EOS_TOKEN)
DEFAULT_MAX_WORDS = 20


def _check_vocab(vocab: Sequence[str]) -> None:
    if not vocab:
        raise DataError("the word-level vocabulary is empty; build it from a split with at least one word")
    if len(set(vocab)) != len(vocab):
        raise DataError("the word-level vocabulary holds duplicate words; deduplicate it (e.g. with top_words)")
    for word in vocab:
        if word in SPECIAL_TOKENS:
            raise DataError(f"vocabulary word {word!r} is a special token spelling; drop it from the vocabulary")
        if not word or word != word.strip() or len(word.split()) != 1:
            raise DataError(f"vocabulary word {word!r} is empty or holds whitespace; words must be single tokens")


def build_word_level_tokenizer(vocab: Sequence[str], *, max_words: int = DEFAULT_MAX_WORDS) -> PreTrainedTokenizerFast:
    """Build TFF's word-level Stack Overflow tokenizer over ``vocab``.

    Args:
        vocab: The V vocabulary words, most frequent first (e.g. from
            :func:`fishmerge.data.stackoverflow.build_vocab`); word ``vocab[i]`` gets id ``i + 1``.
        max_words: Words kept per sentence; ``model_max_length`` is ``max_words + 1`` (BOS included).

    Returns:
        A fast tokenizer with ``pad_token_id == 0``, ``unk_token_id == V + 1`` (the OOV bucket),
        ``bos_token_id == V + 2``, ``eos_token_id == V + 3`` and ``len(tokenizer) == V + 4``.

    Raises:
        DataError: The vocabulary is empty, has duplicates, whitespace or special-token spellings.
    """
    _check_vocab(vocab)
    if max_words < 1:
        raise DataError(f"max_words must be at least 1, got {max_words}; pass a positive sentence length")
    size = len(vocab)
    ids = {PAD_TOKEN: 0, **{word: i + 1 for i, word in enumerate(vocab)}}
    ids.update({OOV_TOKEN: size + 1, BOS_TOKEN: size + 2, EOS_TOKEN: size + 3})
    backend = Tokenizer(models.WordLevel(vocab=ids, unk_token=OOV_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, size + 2)]
    )
    # Kept in tokenizer.json for users of the raw `tokenizers` object; transformers applies its own per call.
    backend.enable_truncation(max_length=max_words + 1)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=OOV_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=max_words + 1,
        padding_side="right",
    )
    logger.debug("word-level tokenizer: %d words, %d ids, max_words=%d", size, len(tokenizer), max_words)
    return tokenizer


def _with_eos(ids: list[int], eos_id: int, max_words: int) -> list[int]:
    # ids = [BOS] + words; EOS only when the sentence was not cut (TFF: fewer than max_words words remain).
    return ids + [eos_id] if len(ids) - 1 < max_words else ids


def encode_sentence(
    tokenizer: PreTrainedTokenizerFast, sentence: str, *, max_words: int = DEFAULT_MAX_WORDS
) -> tuple[list[int], list[int]]:
    """One sentence to TFF's ``(x, y)`` next-word pair.

    Args:
        tokenizer: From :func:`build_word_level_tokenizer` (or reloaded with ``AutoTokenizer``).
        sentence: Space-separated tokens, as in TFF's ``tokens`` feature.
        max_words: Words kept; ``x`` and ``y`` have exactly this length.

    Returns:
        ``x = seq[:-1]`` and ``y = seq[1:]`` of ``seq = [BOS] + ids(first max_words words) + [EOS if fewer
        than max_words]``, each right-padded with PAD (0) to ``max_words``. An empty sentence gives
        ``x = [BOS, 0, ...]``, ``y = [EOS, 0, ...]``.
    """
    x, y = encode_sentences(tokenizer, [sentence], max_words=max_words)
    return x[0].tolist(), y[0].tolist()


def encode_sentences(
    tokenizer: PreTrainedTokenizerFast, sentences: Sequence[str], *, max_words: int = DEFAULT_MAX_WORDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Many sentences to ``(x, y)`` int64 tensors of shape ``(len(sentences), max_words)``; see :func:`encode_sentence`.

    Raises:
        DataError: The tokenizer has no BOS/EOS/PAD token (it was not built by :func:`build_word_level_tokenizer`).
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None or tokenizer.bos_token_id is None:
        raise DataError("tokenizer lacks PAD/BOS/EOS tokens; build it with build_word_level_tokenizer")
    x = torch.full((len(sentences), max_words), pad_id, dtype=torch.long)
    y = torch.full((len(sentences), max_words), pad_id, dtype=torch.long)
    if not sentences:
        return x, y
    encoded = tokenizer(list(sentences), truncation=True, max_length=max_words + 1)["input_ids"]
    for row, ids in enumerate(encoded):
        seq = _with_eos(list(ids), eos_id, max_words)
        x[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        y[row, : len(seq) - 1] = torch.tensor(seq[1:])
    return x, y


def word_sequences(tokenizer, sentences: Sequence[str], max_words: int = DEFAULT_MAX_WORDS) -> list[list[int]]:
    """TFF's word-level sequences [BOS] + first max_words words (+ EOS if fewer), without padding."""
    if not sentences:
        return []
    x, y = encode_sentences(tokenizer, list(sentences), max_words=max_words)
    pad = tokenizer.pad_token_id
    return [[int(xr[0])] + [int(t) for t in yr if t != pad] for xr, yr in zip(x, y)]
