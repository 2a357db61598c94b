"""Read scalar values from TensorBoard event files without TensorBoard or protobuf.

An event file is a sequence of TFRecords (``uint64 length, uint32 crc, data, uint32
crc``), each holding a serialized ``tensorflow.Event`` protocol buffer. Only the fields
scalars need are decoded:

- ``Event``: ``step`` (2, varint), ``summary`` (5, message)
- ``Summary``: ``value`` (1, repeated message)
- ``Summary.Value``: ``tag`` (1, string), ``simple_value`` (2, float32),
  ``tensor`` (8, ``TensorProto``: ``dtype`` 1, ``tensor_content`` 4, ``float_val`` 5,
  ``double_val`` 6, ``int_val`` 7, ``int64_val`` 10), as written by
  ``SummaryWriter.add_scalar`` (``simple_value``, or a scalar tensor with
  ``new_style=True``).

Everything else (text, histograms, images, graphs) is skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

__all__ = ["read_scalars", "EventFileError"]

# TensorProto dtypes (tensorflow/core/framework/types.proto) a scalar may be stored as
_DT_FLOAT, _DT_DOUBLE, _DT_INT32, _DT_INT64, _DT_HALF = 1, 2, 3, 9, 19


class EventFileError(ValueError):
    """The file is not a readable TensorBoard event file."""


def read_scalars(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in one event file, in file order.

    A truncated last record (a file still being written) is ignored.
    """
    data = Path(path).read_bytes()
    out: dict[str, list[tuple[int, float]]] = {}
    for record in _records(data, path):
        step = 0
        summaries = []
        for field, wire, value in _fields(record):
            if field == 2 and wire == 0:
                step = _signed64(value)
            elif field == 5 and wire == 2:
                summaries.append(value)
        for summary in summaries:
            for field, wire, value in _fields(summary):
                if field == 1 and wire == 2:
                    parsed = _scalar_value(value)
                    if parsed is not None:
                        out.setdefault(parsed[0], []).append((step, parsed[1]))
    return out


def _records(data: bytes, path) -> Iterator[bytes]:
    pos, n = 0, len(data)
    while pos < n:
        if pos + 12 > n:
            return  # truncated header (file being written)
        (length,) = struct.unpack_from("<Q", data, pos)
        start = pos + 12
        end = start + length
        if end + 4 > n:
            if pos == 0:
                raise EventFileError(f"{path} is not a TensorBoard event file")
            return
        yield data[start:end]
        pos = end + 4


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise EventFileError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise EventFileError("varint too long")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """``(field number, wire type, value)``: varint -> int, fixed -> raw bytes,
    length-delimited -> bytes."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:  # groups (3, 4) are not used by event files
            raise EventFileError(f"unsupported protobuf wire type {wire}")
        if pos > n:
            raise EventFileError("truncated protobuf message")
        yield field, wire, value


def _scalar_value(buf: bytes) -> tuple[str, float] | None:
    tag = None
    value = None
    for field, wire, raw in _fields(buf):
        if field == 1 and wire == 2:
            tag = raw.decode("utf-8", errors="replace")
        elif field == 2 and wire == 5:
            (value,) = struct.unpack("<f", raw)
        elif field == 8 and wire == 2:
            value = _tensor_scalar(raw)
    if tag is None or value is None:
        return None
    return tag, float(value)


def _tensor_scalar(buf: bytes) -> float | None:
    dtype = None
    content = b""
    floats: list[float] = []
    ints: list[int] = []
    for field, wire, raw in _fields(buf):
        if field == 1 and wire == 0:
            dtype = raw
        elif field == 4 and wire == 2:
            content = raw
        elif field == 5:  # float_val: packed (2) or not (5)
            floats += _unpack(raw, "f", 4) if wire == 2 else [struct.unpack("<f", raw)[0]]
        elif field == 6:  # double_val
            floats += _unpack(raw, "d", 8) if wire == 2 else [struct.unpack("<d", raw)[0]]
        elif field in (7, 10):  # int_val, int64_val
            ints += _unpack_varints(raw) if wire == 2 else [_signed64(raw)]
    if floats:
        return floats[0]
    if content:
        fmt = {_DT_FLOAT: "<f", _DT_DOUBLE: "<d", _DT_INT32: "<i", _DT_INT64: "<q", _DT_HALF: "<e"}
        if dtype in fmt and len(content) >= struct.calcsize(fmt[dtype]):
            return float(struct.unpack_from(fmt[dtype], content)[0])
        return None
    if ints:
        return float(ints[0])
    return None


def _unpack(raw: bytes, code: str, size: int) -> list[float]:
    return list(struct.unpack(f"<{len(raw) // size}{code}", raw[: len(raw) // size * size]))


def _unpack_varints(raw: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(raw):
        v, pos = _varint(raw, pos)
        out.append(_signed64(v))
    return out
