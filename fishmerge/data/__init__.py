"""The data layer: federated text datasets as per-user clients.

* :mod:`~fishmerge.data.stackoverflow`: TensorFlow Federated's ``stackoverflow.sqlite`` (streaming reader,
  writer for the same schema, word-level vocabulary);
* :mod:`~fishmerge.data.tokenizer`: the word-level task (Reddi et al. 2021) as a Hugging Face tokenizer and
  the ``(x, y)`` next-word encoding;
* :mod:`~fishmerge.data.posts_xml`: Stack Exchange ``Posts.xml`` dumps cleaned into the same schema;
* :mod:`~fishmerge.data.synthetic`: seeded synthetic users in the same schema, no downloads;
* :mod:`~fishmerge.data.partition`: any ``datasets.Dataset`` with user and text columns to per-user clients;
* :mod:`~fishmerge.data.example_proto`: ``tf.train.Example`` encoding without TensorFlow.
"""

from fishmerge.data.example_proto import decode_example, encode_example
from fishmerge.data.partition import partition_by_user
from fishmerge.data.posts_xml import PostsConversion, clean_body, convert_posts_xml, split_of
from fishmerge.data.stackoverflow import (
    SPLITS,
    ClientInfo,
    StackOverflowReader,
    StackOverflowWriter,
    build_vocab,
    count_words,
    decode_stackoverflow_example,
    encode_stackoverflow_example,
    top_words,
)
from fishmerge.data.synthetic import (
    TOPICS,
    SyntheticUser,
    general_sentences,
    synthetic_user,
    topic_sentences,
    topic_vocabulary,
    write_synthetic_stackoverflow,
)
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

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "OOV_TOKEN",
    "PAD_TOKEN",
    "SPLITS",
    "TOPICS",
    "ClientInfo",
    "PostsConversion",
    "StackOverflowReader",
    "StackOverflowWriter",
    "SyntheticUser",
    "build_vocab",
    "build_word_level_tokenizer",
    "clean_body",
    "convert_posts_xml",
    "count_words",
    "decode_example",
    "decode_stackoverflow_example",
    "encode_example",
    "encode_sentence",
    "encode_sentences",
    "word_sequences",
    "encode_stackoverflow_example",
    "general_sentences",
    "partition_by_user",
    "split_of",
    "synthetic_user",
    "top_words",
    "topic_sentences",
    "topic_vocabulary",
    "write_synthetic_stackoverflow",
]
