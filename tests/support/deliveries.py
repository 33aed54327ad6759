"""Hypothesis strategies for whole AMQP deliveries: properties, header tables of every AMQP type,
and bodies from valid to hostile.  Used by the codec's property tests, the broker-level fuzz
test and ``bench/fuzz_deliveries.py``."""

from __future__ import annotations

import decimal
import json
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import any_pb2
from hypothesis import strategies as st
from pamqp import decode

from indexer.changes import Kind
from indexer.events import core_pb2, job_pb2, trigger_pb2
from indexer.ingest import wire

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HUGE_BYTES = 16 * 1024  # the fuzz runs the indexer with this size limit (INDEXER_MAX_MESSAGE_BYTES)
CONTENT_TYPES = [None, "", wire.CONTENT_TYPE, "application/octet-stream", "application/json",
                 "application/json; charset=utf-8", "application/json; charset=latin-1", "text/plain",
                 "APPLICATION/X-PROTOBUF"]

# ---- header tables: every value type pamqp decodes to -------------------------------------------


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


_names = st.text(min_size=1, max_size=20)


def _scalars(*, finite: bool) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=not finite, allow_infinity=not finite),
        st.floats(width=32, allow_nan=not finite, allow_infinity=not finite),
        st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-(10**7), max_value=10**7),
        st.text(max_size=40),
        st.binary(max_size=40).filter(lambda b: not _utf8(b)),  # a long string that is not UTF-8 decodes to bytes
        st.binary(max_size=40).map(bytearray),
        st.integers(min_value=0, max_value=253_402_300_799_999).map(lambda n: decode.timestamp(struct.pack(">Q", n))[1]),
        st.none(),
    )


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(_names, inner, max_size=4)


def _tables(*, finite: bool) -> st.SearchStrategy[dict[str, Any]]:
    values = st.recursive(_scalars(finite=finite), _containers, max_leaves=20)
    return st.dictionaries(_names.filter(lambda n: not n.startswith("x-")), values, max_size=8)


# What pamqp can decode from any producer.  NaN and the infinities included: the broker itself
# (RabbitMQ 3.x, Erlang) closes the connection of a producer that sends them in a header, so they
# never reach a consumer; ``broker_header_tables`` leaves them out.
header_tables = _tables(finite=False)
broker_header_tables = _tables(finite=True)

# Properties a producer may set (message_id is the fuzz's own, to find each delivery again).
properties = st.fixed_dictionaries(
    {},
    optional={
        "content_encoding": st.sampled_from(["gzip", "identity", "utf-8"]),
        "priority": st.integers(min_value=0, max_value=9),
        "correlation_id": st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 255),
        "reply_to": st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 255),
        "expiration": st.integers(min_value=60_000, max_value=86_400_000).map(str),
        "timestamp": st.integers(min_value=0, max_value=2**32 - 1).map(lambda s: datetime.fromtimestamp(s, UTC)),
        "message_type": st.text(min_size=1, max_size=20),
        "app_id": st.text(min_size=1, max_size=20),
        "delivery_mode": st.sampled_from([1, 2]),
    },
)

# ---- bodies -----------------------------------------------------------------------------------


def _mention(kind: Kind, mention_id: int, org: int | None, seconds: int) -> bytes:
    message = wire.mention_message(kind, mention_id, org, None, T0 + timedelta(seconds=seconds))
    return wire.encode(wire.build_event(message, organization_id=str(org or "")))


def _refresh(org: str) -> bytes:
    """A TriggerCacheRefresh for ``org`` as any producer may write it (ours refuses a bad id)."""
    event = wire.build_event(trigger_pb2.TriggerCacheRefresh())
    event.core.organization_id = org
    return wire.encode(event)


def _nested_any(depth: int) -> bytes:
    """A VtEvent whose data packs a VtEvent whose data packs … ``depth`` times."""
    event = wire.build_event(trigger_pb2.TriggerCacheRefresh())
    for _ in range(depth):
        outer = core_pb2.VtEvent()
        outer.data.Pack(event)
        event = outer
    return wire.encode(event)


def _deep_json(depth: int) -> bytes:
    return ('{"data": ' * depth + "{}" + "}" * depth).encode()


valid_bodies = st.one_of(
    st.builds(_mention, st.sampled_from(list(Kind)), st.integers(1, 10**6), st.integers(1, 1000), st.integers(0, 10**6)),
    st.sampled_from(["", "7", "007", "0", "-1", "*", "1" * 30]).map(_refresh),
    st.just(wire.encode(wire.build_event(job_pb2.JobCreated()))),  # a valid event of another type
)
hostile_bodies = st.one_of(
    st.binary(max_size=300),
    valid_bodies.flatmap(lambda body: st.integers(0, max(0, len(body) - 1)).map(lambda n: body[:n])),  # truncated
    st.integers(1, 120).map(_nested_any),
    st.sampled_from([10, 1_000, 5_000]).map(_deep_json),
    st.just(wire.mention_message(Kind.INSERTED, 1, 2, None, T0).SerializeToString()),  # payload without envelope
    st.just(any_pb2.Any(type_url="type.googleapis.com/events.MentionInserted", value=b"\xff\xff").SerializeToString()),
    st.sampled_from([b"{}", b"[]", b"null", b'"x"', json.dumps({"data": {"@type": "x"}}).encode(), b"\xef\xbb\xbf{}"]),
    st.integers(1, 4).map(lambda n: b"\x0a" + b"\xff" * n),
    st.just(b"\x00" * (HUGE_BYTES + 1)),  # beyond the limit the fuzz runs with
)
bodies = st.one_of(valid_bodies, hostile_bodies)


@dataclass
class Delivery:
    body: bytes
    content_type: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)


deliveries = st.builds(Delivery, bodies, st.sampled_from(CONTENT_TYPES), broker_header_tables, properties)


def same(left: Any, right: Any) -> bool:
    """Equal as decoded header values: floats bit for bit (NaN too), arrays in order; a table is a
    map (the broker may reorder its fields)."""
    if isinstance(left, float) and isinstance(right, float):
        return struct.pack(">d", left) == struct.pack(">d", right)
    if isinstance(left, dict) and isinstance(right, dict):
        return set(left) == set(right) and all(same(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(same, left, right))
    if isinstance(left, decimal.Decimal) and isinstance(right, decimal.Decimal):
        return left == right
    return type(left) is type(right) and left == right
