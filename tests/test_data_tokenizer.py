"""Word-level Stack Overflow tokenizer: SPEC §5 ids against hand-computed oracles, and a Hub round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from fishmerge.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    OOV_TOKEN,
    PAD_TOKEN,
    build_word_level_tokenizer,
    encode_sentence,
    encode_sentences,
    word_sequences,
)
from fishmerge.errors import DataError

VOCAB = ["the", "i", "to", ".", "python", "list", "a", "how", "sort", "?"]  # ids 1..10
OOV, BOS, EOS = 11, 12, 13


def pad(ids: list[int], length: int = 20) -> list[int]:
    return ids + [0] * (length - len(ids))


@pytest.fixture(scope="module")
def tok():
    return build_word_level_tokenizer(VOCAB)


def test_special_ids_follow_spec(tok):
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, OOV, BOS, EOS)
    assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token) == (PAD_TOKEN, OOV_TOKEN, BOS_TOKEN, EOS_TOKEN)
    assert len(tok) == len(VOCAB) + 4
    assert tok.convert_tokens_to_ids(["the", "?"]) == [1, 10]


def test_spec_sized_vocabulary_ids():
    big = build_word_level_tokenizer([f"w{i}" for i in range(10_000)])
    assert (big.pad_token_id, big.unk_token_id, big.bos_token_id, big.eos_token_id) == (0, 10_001, 10_002, 10_003)
    x, y = encode_sentence(big, "w0 w9999 nope")
    assert x == pad([10_002, 1, 10_000, 10_001])
    assert y == pad([1, 10_000, 10_001, 10_003])


def test_short_sentence(tok):
    x, y = encode_sentence(tok, "how to sort a list ?")
    assert x == pad([BOS, 8, 3, 9, 7, 6, 10])
    assert y == pad([8, 3, 9, 7, 6, 10, EOS])


def test_oov_words_share_one_bucket(tok):
    x, y = encode_sentence(tok, "i sort numpy arrays .")
    assert x == pad([BOS, 2, 9, OOV, OOV, 4])
    assert y == pad([2, 9, OOV, OOV, 4, EOS])


def test_exactly_twenty_words_gets_no_eos(tok):
    x, y = encode_sentence(tok, " ".join(["the"] * 20))
    assert x == [BOS] + [1] * 19
    assert y == [1] * 20


def test_nineteen_words_gets_eos(tok):
    x, y = encode_sentence(tok, " ".join(["the"] * 19))
    assert x == [BOS] + [1] * 19
    assert y == [1] * 19 + [EOS]


def test_twenty_five_words_cut_to_first_twenty(tok):
    sentence = " ".join(VOCAB * 2 + ["extra", "words", "never", "seen", "here"])
    ids = list(range(1, 11)) * 2
    x, y = encode_sentence(tok, sentence)
    assert x == [BOS] + ids[:19]
    assert y == ids


def test_empty_sentence_and_whitespace_runs(tok):
    assert encode_sentence(tok, "") == (pad([BOS]), pad([EOS]))
    assert encode_sentence(tok, "  how \t to  ") == (pad([BOS, 8, 3]), pad([8, 3, EOS]))


def test_plain_call_gives_bos_and_words(tok):
    assert tok("how to sort")["input_ids"] == [BOS, 8, 3, 9]


def test_batch_matches_single_and_custom_length(tok):
    sentences = ["how to sort a list ?", " ".join(["a"] * 30), "python"]
    x, y = encode_sentences(tok, sentences)
    assert x.dtype == torch.long and x.shape == (3, 20)
    for row, sentence in enumerate(sentences):
        assert (x[row].tolist(), y[row].tolist()) == encode_sentence(tok, sentence)
    x5, y5 = encode_sentences(tok, ["how to sort a list ?"], max_words=5)
    assert x5.tolist() == [[BOS, 8, 3, 9, 7]] and y5.tolist() == [[8, 3, 9, 7, 6]]
    assert encode_sentences(tok, [])[0].shape == (0, 20)


def test_save_pretrained_autotokenizer_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.pad_token, loaded.unk_token, loaded.bos_token, loaded.eos_token) == (
        PAD_TOKEN, OOV_TOKEN, BOS_TOKEN, EOS_TOKEN)
    assert (loaded.pad_token_id, loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, OOV, BOS, EOS)
    assert loaded.get_vocab() == tok.get_vocab()
    for sentence in ["how to sort a list ?", "i sort numpy arrays .", " ".join(VOCAB * 3), ""]:
        assert loaded(sentence)["input_ids"] == tok(sentence)["input_ids"]
        assert encode_sentence(loaded, sentence) == encode_sentence(tok, sentence)


@pytest.mark.parametrize(
    "vocab, match",
    [([], "empty"), (["a", "a"], "duplicate"), (["a", "<EOS>"], "special token"), (["a b"], "whitespace"), ([""], "empty")],
)
def test_bad_vocabularies_raise_data_error(vocab, match):
    with pytest.raises(DataError, match=match):
        build_word_level_tokenizer(vocab)


def test_word_sequences_are_the_unpadded_tff_sequences(tok):
    short, long = word_sequences(tok, ["how to sort a list ?", " ".join(["the"] * 25)])
    assert short == [BOS, 8, 3, 9, 7, 6, 10, EOS]  # [BOS] + words + EOS: fewer than 20 words
    assert long == [BOS] + [1] * 20  # cut to 20 words, no EOS
    assert word_sequences(tok, []) == []
