"""Encode and decode ``tf.train.Example`` protos by hand, without TensorFlow or protobuf.

TensorFlow Federated stores each Stack Overflow sentence as one serialized ``tf.train.Example``. The message
is small enough to speak its wire format directly::

    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }     // repeated entry {string key = 1; Feature value = 2;}
    Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }
    Int64List { repeated int64 value = 1 [packed = true]; }

The decoder accepts packed and unpacked numeric lists and skips unknown fields, as protobuf parsers do. The
encoder writes map entries in sorted key order, so equal inputs give byte-identical outputs.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Union

from fishmerge.errors import DataError

logger = logging.getLogger(__name__)

Scalar = Union[bytes, str, int, float]
FeatureInput = Union[Scalar, Sequence[Scalar]]
FeatureList = Union[list[bytes], list[int], list[float]]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_BYTES_LIST, _FLOAT_LIST, _INT64_LIST = 1, 2, 3
_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


# --------------------------------------------------------------------------------------------- wire helpers
def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:  # keys and short lengths: the common case by far
        return _ONE_BYTE[value]
    # Negative int64 values are sent as their 64-bit two's complement, i.e. always 10 bytes.
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    if pos < len(buf) and buf[pos] < 0x80:
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise DataError("truncated varint in a serialized tf.train.Example; re-export the dataset file")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DataError("varint longer than 10 bytes in a serialized tf.train.Example; the file is corrupt")


def _to_int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _len_field(field: int, payload: bytes) -> bytes:
    return b"".join((_varint((field << 3) | _LEN), _varint(len(payload)), payload))


def _fields(buf: bytes) -> list[tuple[int, int, object]]:
    """Split a message into (field number, wire type, raw value) triples, in wire order."""
    out: list[tuple[int, int, object]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire_type == _I64:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire_type == _I32:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise DataError(f"unsupported protobuf wire type {wire_type} in a tf.train.Example; the file is corrupt")
        if pos > len(buf):
            raise DataError("truncated field in a serialized tf.train.Example; re-export the dataset file")
        out.append((field, wire_type, value))
    return out


# ------------------------------------------------------------------------------------------------- encode
def _as_list(name: str, value: FeatureInput) -> list[Scalar]:
    if isinstance(value, (bytes, str, int, float)):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    raise DataError(f"feature {name!r} has unsupported type {type(value).__name__}; pass bytes, str, int, float or a list")


def _encode_feature(name: str, value: FeatureInput) -> bytes:
    values = _as_list(name, value)
    if all(isinstance(v, (bytes, str)) for v in values):
        # An empty list lands here too: TensorFlow reads an empty bytes_list as a zero-length feature.
        payload = b"".join(_len_field(1, v.encode("utf-8") if isinstance(v, str) else v) for v in values)
        return _len_field(_BYTES_LIST, payload)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if any(not -(1 << 63) <= v < (1 << 63) for v in values):
            raise DataError(f"feature {name!r} holds an integer outside int64; clip or store it as a string")
        packed = b"".join(_varint(v) for v in values)
        return _len_field(_INT64_LIST, _len_field(1, packed))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        packed = struct.pack(f"<{len(values)}f", *values)
        return _len_field(_FLOAT_LIST, _len_field(1, packed))
    raise DataError(f"feature {name!r} mixes value types; give one of bytes/str, int or float per feature")


def encode_example(features: Mapping[str, FeatureInput]) -> bytes:
    """Serialize features as a ``tf.train.Example``.

    Args:
        features: Feature name to a value or a list of values. ``str``/``bytes`` become a ``bytes_list``
            (str as UTF-8), ``int`` an ``int64_list``, ``float`` (or ints mixed with floats) a ``float_list``.

    Returns:
        The serialized proto; keys are written in sorted order, so the output is deterministic.

    Raises:
        DataError: A value has an unsupported or mixed type, or an integer does not fit in int64.
    """
    entries = []
    for name in sorted(features):
        value = features[name]
        if isinstance(value, (bytes, str, int, float)):
            entries.append(_scalar_entry(name, value))
        else:
            entries.append(_entry(name, value))
    return _len_field(1, b"".join(entries))


def _entry(name: str, value: FeatureInput) -> bytes:
    return _len_field(1, _len_field(1, name.encode("utf-8")) + _len_field(2, _encode_feature(name, value)))


# Sentences of one post share title, tags, date and score: caching their entries halves conversion time.
# typed=True keeps 1, 1.0 and True apart (they hash equal but encode differently).
@functools.lru_cache(maxsize=4096, typed=True)
def _scalar_entry(name: str, value: Scalar) -> bytes:
    return _entry(name, value)


# ------------------------------------------------------------------------------------------------- decode
def _decode_numeric(kind: int, list_msg: bytes) -> list[int] | list[float]:
    values: list = []
    for field, wire_type, raw in _fields(list_msg):
        if field != 1:
            continue
        if kind == _INT64_LIST:
            if wire_type == _VARINT:
                values.append(_to_int64(raw))  # type: ignore[arg-type]
            else:  # packed
                pos = 0
                while pos < len(raw):  # type: ignore[arg-type]
                    v, pos = _read_varint(raw, pos)  # type: ignore[arg-type]
                    values.append(_to_int64(v))
        else:
            data = raw  # a packed block (LEN) or a single unpacked fixed32 value
            if len(data) % 4:  # type: ignore[arg-type]
                raise DataError("float_list payload is not a multiple of 4 bytes; the file is corrupt")
            values.extend(struct.unpack(f"<{len(data) // 4}f", data))  # type: ignore[arg-type]
    return values


def _decode_feature(buf: bytes) -> FeatureList:
    result: FeatureList = []
    for kind, _, raw in _fields(buf):
        if kind == _BYTES_LIST:
            result = [v for f, _, v in _fields(raw) if f == 1]  # type: ignore[misc, arg-type]
        elif kind in (_FLOAT_LIST, _INT64_LIST):
            result = _decode_numeric(kind, raw)  # type: ignore[arg-type]
    return result


def decode_example(data: bytes) -> dict[str, FeatureList]:
    """Parse a serialized ``tf.train.Example``.

    Args:
        data: The serialized proto.

    Returns:
        Feature name to its list of values: ``list[bytes]`` for a bytes_list, ``list[int]`` for an
        int64_list, ``list[float]`` for a float_list (an empty feature gives ``[]``).

    Raises:
        DataError: The bytes are not a well-formed Example.
    """
    features: dict[str, FeatureList] = {}
    for field, _, features_msg in _fields(bytes(data)):
        if field != 1:
            continue
        for entry_field, _, entry in _fields(features_msg):  # type: ignore[arg-type]
            if entry_field != 1:
                continue
            name, value = "", b""
            for f, _, raw in _fields(entry):  # type: ignore[arg-type]
                if f == 1:
                    name = raw.decode("utf-8")  # type: ignore[union-attr]
                elif f == 2:
                    value = raw  # type: ignore[assignment]
            features[name] = _decode_feature(value)  # type: ignore[arg-type]
    return features
