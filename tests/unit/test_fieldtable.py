"""Header tables written back by ``ingest.fieldtable`` decode to exactly what was decoded first.

The decoder is pamqp's, the one that reads every delivery: whatever it can produce from any
producer's table, the encoder writes so that it reads back equal (floats bit for bit).
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import decode
from pamqp.commands import Basic

from indexer.ingest.fieldtable import Unencodable, encode_table
from indexer.ingest.republish import ExactProperties
from tests.support.deliveries import header_tables, same


@settings(max_examples=500, deadline=None)
@given(header_tables)
def test_every_decoded_table_is_written_back_to_itself(table: dict[str, Any]) -> None:
    _, decoded = decode.field_table(encode_table(table))
    assert same(decoded, table)


@settings(max_examples=300, deadline=None)
@given(header_tables, st.text(max_size=40), st.integers(min_value=0, max_value=9), st.sampled_from([1, 2]))
def test_properties_keep_every_field(table: dict[str, Any], text: str, priority: int, mode: int) -> None:
    properties = ExactProperties(
        headers=table, content_type=text[:255] or None, priority=priority, delivery_mode=mode,
        correlation_id="c", message_id="m", app_id="a", message_type="t", reply_to="r",
    )
    data = properties.marshal()
    flags = struct.unpack(">H", data[:2])[0]
    back = Basic.Properties()
    back.unmarshal(flags, data[2:])
    assert same(back.headers, table)
    for name in ("priority", "delivery_mode", "correlation_id", "message_id", "app_id", "message_type", "reply_to"):
        assert getattr(back, name) == getattr(properties, name)


def test_doubles_beyond_float32_and_nan_survive() -> None:
    table = {"max": 1.7976931348623157e308, "tiny": 5e-324, "nan": math.nan, "inf": -math.inf, "p": 0.1}
    _, decoded = decode.field_table(encode_table(table))
    assert all(same(decoded[k], v) for k, v in table.items())


def test_the_table_keeps_its_order() -> None:
    table = {"z": 1, "a": 2, "m": 3}
    assert list(decode.field_table(encode_table(table))[1]) == ["z", "a", "m"]


@pytest.mark.parametrize(
    ("table", "where"),
    [({"x": object()}, "x"), ({"n": {"deep": [1, {1, 2}]}}, "n.deep[1]"), ({"big": 2**64}, "big"), ({"k" * 256: 1}, "kkk")],
)
def test_what_no_amqp_type_carries_is_named(table: dict[str, Any], where: str) -> None:
    with pytest.raises(Unencodable, match=re.escape(f"header {where}")):
        encode_table(table)
