"""AMQP field tables encoded so that every decoded value comes back exactly.  No I/O here.

Why not pamqp's encoder: it writes every Python ``float`` as a 32-bit ``f``, so a producer's
64-bit ``d`` header (amqplib sends every non-integer number as one) is narrowed when we republish
it, and one beyond the float32 range (``1.7976931348623157e308``, a common "no limit" sentinel)
cannot be written at all.  It also refuses the ``bytes`` it decodes a long string that is not
UTF-8 into, truncates long field names and sorts the keys.

Here every float is a ``d`` (exact for what was an ``f`` too), a long string that was not UTF-8
is written back byte for byte, names keep their bytes and the table keeps its order.  What the
decoding layer cannot tell apart stays as close as AMQP allows: an integer gets the smallest
type that holds its value (the value is exact, its width may differ from the producer's), and a
``f`` comes back as the ``d`` of the same value.
"""

from __future__ import annotations

import datetime
import decimal
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pamqp import encode

_LONG = struct.Struct(">I")
_DOUBLE = struct.Struct(">d")
_QUAD = struct.Struct(">Q")
_SECONDS_AT_MOST = 0xFFFFFFFF  # beyond, pamqp reads a timestamp as milliseconds
_MAX_NAME_BYTES = 255  # a field name is a short string


class Unencodable(TypeError):
    """A value that no AMQP field type can carry; ``path`` says where it is in the table."""

    def __init__(self, path: str, value: object) -> None:
        self.path = path
        super().__init__(f"header {path}: cannot encode a {type(value).__name__} in an AMQP field table")


def encode_table(table: Mapping[str, Any], path: str = "") -> bytes:
    """The field table ``table`` as its wire bytes (length first)."""
    parts = []
    for name, value in table.items():
        key = name.encode("utf-8") if isinstance(name, str) else bytes(name)
        if len(key) > _MAX_NAME_BYTES:
            raise Unencodable(f"{path}{name[:40]}…", name)
        parts.append(bytes((len(key),)) + key + _value(value, f"{path}{name}"))
    data = b"".join(parts)
    return _LONG.pack(len(data)) + data


def _array(values: Sequence[Any], path: str) -> bytes:
    data = b"".join(_value(item, f"{path}[{index}]") for index, item in enumerate(values))
    return _LONG.pack(len(data)) + data


def _timestamp(moment: datetime.datetime) -> bytes:
    """Seconds since the epoch, as AMQP has it; or milliseconds, where pamqp read milliseconds
    (a value beyond 2106, which it takes for milliseconds, decodes to a fraction of a second)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    seconds = moment.timestamp()
    if seconds.is_integer() and 0 <= seconds <= _SECONDS_AT_MOST:
        return _QUAD.pack(int(seconds))
    return _QUAD.pack(round(seconds * 1000))


def _value(value: Any, path: str) -> bytes:
    try:
        if isinstance(value, bool):
            return b"t" + encode.boolean(value)
        if isinstance(value, int):
            return encode.table_integer(value)
        if isinstance(value, float):
            return b"d" + _DOUBLE.pack(value)
        if isinstance(value, decimal.Decimal):
            return b"D" + encode.decimal(value)
        if isinstance(value, str):
            return b"S" + encode.long_string(value)
        if isinstance(value, bytes):  # a long string that was not UTF-8
            return b"S" + _LONG.pack(len(value)) + value
        if isinstance(value, bytearray):
            return b"x" + encode.byte_array(value)
        if isinstance(value, datetime.datetime):
            return b"T" + _timestamp(value)
        if isinstance(value, time.struct_time):
            return b"T" + encode.timestamp(value)
        if isinstance(value, Mapping):
            return b"F" + encode_table(value, f"{path}.")
        if isinstance(value, list | tuple):
            return b"A" + _array(value, path)
        if value is None:
            return b"V"
    except Unencodable:
        raise
    except (TypeError, ValueError, OverflowError, struct.error, decimal.InvalidOperation):
        raise Unencodable(path, value) from None
    raise Unencodable(path, value)
