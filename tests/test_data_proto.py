"""tf.train.Example wire format: hand-assembled bytes as the oracle, round trips, protobuf edge cases."""

from __future__ import annotations

import pytest

from fishmerge.data.example_proto import decode_example, encode_example
from fishmerge.errors import DataError

# Example{features{feature{key:"a" value{int64_list{value:[1]}}}}}, as TensorFlow serializes it.
INT_EXAMPLE = bytes.fromhex("0a0c" "0a0a" "0a0161" "1205" "1a03" "0a0101")
# Example{features{feature{key:"t" value{bytes_list{value:["hi"]}}}}}
BYTES_EXAMPLE = bytes.fromhex("0a0d" "0a0b" "0a0174" "1206" "0a04" "0a026869")


def test_encode_matches_hand_assembled_bytes():
    assert encode_example({"a": 1}) == INT_EXAMPLE
    assert encode_example({"t": "hi"}) == BYTES_EXAMPLE
    assert encode_example({"t": [b"hi"]}) == BYTES_EXAMPLE


def test_decode_hand_assembled_bytes():
    assert decode_example(INT_EXAMPLE) == {"a": [1]}
    assert decode_example(BYTES_EXAMPLE) == {"t": [b"hi"]}


def test_negative_int64_is_ten_byte_twos_complement():
    encoded = encode_example({"s": -1})
    assert bytes.fromhex("ffffffffffffffffff01") in encoded
    assert decode_example(encoded) == {"s": [-1]}


def test_round_trip_all_kinds_and_key_order():
    features = {
        "tokens": "how do i sort a list ?",
        "tags": "python|sorting",
        "score": [-(1 << 63), 0, 300, (1 << 63) - 1],
        "weights": [0.5, -2.0, 1.25],
        "empty": [],
    }
    encoded = encode_example(features)
    assert encode_example(dict(reversed(list(features.items())))) == encoded  # sorted keys: deterministic
    decoded = decode_example(encoded)
    assert decoded["tokens"] == [b"how do i sort a list ?"]
    assert decoded["tags"] == [b"python|sorting"]
    assert decoded["score"] == features["score"]
    assert decoded["weights"] == features["weights"]
    assert decoded["empty"] == []


def test_decode_unpacked_numeric_lists_and_unknown_fields():
    unpacked_ints = bytes.fromhex("08050807")  # Int64List with value 5 and 7, each as its own varint field
    feature = bytes.fromhex("1a04") + unpacked_ints
    entry = bytes.fromhex("0a0178") + bytes([0x12, len(feature)]) + feature
    features = bytes([0x0A, len(entry)]) + entry
    unknown = bytes.fromhex("2803")  # field 5, varint 3: must be skipped
    example = bytes([0x0A, len(features)]) + features + unknown
    assert decode_example(example) == {"x": [5, 7]}

    one_float = bytes.fromhex("0d0000c03f")  # FloatList with one unpacked fixed32 value 1.5
    feature = bytes([0x12, len(one_float)]) + one_float
    entry = bytes.fromhex("0a0166") + bytes([0x12, len(feature)]) + feature
    example = bytes([0x0A, len(entry) + 2, 0x0A, len(entry)]) + entry
    assert decode_example(example) == {"f": [1.5]}


@pytest.mark.parametrize("blob", [INT_EXAMPLE[:-1], b"\x0a\xff", b"\x0b"])
def test_corrupt_bytes_raise_data_error(blob):
    with pytest.raises(DataError):
        decode_example(blob)


def test_unsupported_values_raise_data_error():
    with pytest.raises(DataError, match="mixes value types"):
        encode_example({"x": ["a", 1]})
    with pytest.raises(DataError, match="int64"):
        encode_example({"x": 1 << 63})
    with pytest.raises(DataError, match="unsupported type"):
        encode_example({"x": object()})
