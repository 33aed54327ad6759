"""The codec: every seed message round-trips, every refusal says why, nothing else escapes."""

from __future__ import annotations

import json
import re
import socket
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from indexer.changes import CacheRefresh, Change, Kind
from indexer.errors import BadOrganizationId, BadTimestamp, MissingField, OutOfRange, Refused, TooLarge, Undecodable
from indexer.events import core_pb2, job_pb2, mention_notification_pb2, trigger_pb2
from indexer.ingest import wire
from indexer.ingest.wire import SEED_MODULES
from indexer.timestamps import parse_timestamp

UTC = timezone.utc
MAX = 64 * 1024
TX = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)  # the transaction timestamp of payload()
DATE = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
# Every top-level message of the nine seed files.
ALL_MESSAGES = sorted(
    descriptor.full_name
    for module in SEED_MODULES
    for descriptor in module.DESCRIPTOR.message_types_by_name.values()
)
MENTION_CLASSES = {
    Kind.INSERTED: mention_notification_pb2.MentionInserted,
    Kind.UPDATED: mention_notification_pb2.MentionUpdated,
    Kind.DELETED: mention_notification_pb2.MentionDeleted,
}


def body_of(message: Message, **core: Any) -> bytes:
    return wire.encode(wire.build_event(message, **core))


def json_of(message: Message, **core: Any) -> bytes:
    return json_format.MessageToJson(wire.build_event(message, **core)).encode()


def decode(body: bytes, content_type: str | None = wire.CONTENT_TYPE) -> wire.Decoded:
    return wire.decode(body, content_type, max_bytes=MAX)


def payload(**fields: Any) -> mention_notification_pb2.MentionModifiedData:
    defaults: dict[str, Any] = {
        "mention_id": 42,
        "organization_id": 7,
        "mention_date": "Tue, 02 Jan 2024 03:04:05 UTC",
        "transaction_timestamp": "2024-05-06T07:08:09.123456Z",
    }
    return mention_notification_pb2.MentionModifiedData(**(defaults | fields))


def raw_event(type_url: str, value: bytes, organization_id: str = "") -> bytes:
    event = core_pb2.VtEvent(core=core_pb2.Core(id="e1", organization_id=organization_id))
    event.data.type_url = type_url
    event.data.value = value
    return wire.encode(event)


def refusal(body: bytes, content_type: str | None = wire.CONTENT_TYPE) -> Refused:
    with pytest.raises(Refused) as caught:
        decode(body, content_type)
    assert "\n" not in caught.value.reason
    return caught.value


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
def test_mention_events_become_changes(kind: Kind, as_json: bool) -> None:
    message = wire.mention_message(kind, 42, 7, DATE, TX)
    event = wire.build_event(message, trace_context={"traceparent": "00-abc-def-01"})
    body = json_format.MessageToJson(event).encode() if as_json else wire.encode(event)
    change = decode(body, wire.JSON_CONTENT_TYPE if as_json else wire.CONTENT_TYPE)
    assert change == Change(kind, 42, 7, DATE, TX, event_id=event.core.id)
    assert isinstance(change, Change)
    assert change.trace_context == {"traceparent": "00-abc-def-01"}


def test_delete_without_organization_or_date() -> None:
    change = decode(body_of(wire.mention_message(Kind.DELETED, 42, None, None, TX)))
    assert isinstance(change, Change)
    assert (change.organization_id, change.mention_date) == (None, None)


@pytest.mark.parametrize(("organization_id", "expected"), [("", None), ("12", 12), ("9223372036854775807", 2**63 - 1)])
@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
def test_trigger_becomes_cache_refresh(organization_id: str, expected: int | None, as_json: bool) -> None:
    event = wire.build_event(wire.refresh_message(), organization_id=organization_id)
    if as_json:
        item = decode(json_format.MessageToJson(event).encode(), "application/json; charset=utf-8")
    else:
        item = decode(wire.encode(event))
    assert item == CacheRefresh(expected, event_id=event.core.id)


@pytest.mark.parametrize("full_name", ALL_MESSAGES)
@pytest.mark.parametrize("as_json", [False, True], ids=["protobuf", "json"])
def test_every_seed_message_round_trips(full_name: str, as_json: bool) -> None:
    assert len(ALL_MESSAGES) == 35  # 40 in the seed less 3 map entries and 2 nested messages
    message_class = wire.message_class(full_name)
    assert message_class is not None
    message = message_class()
    if full_name.startswith("events.Mention") and hasattr(message, "payload"):
        message.payload.CopyFrom(payload())
    event = wire.build_event(message, organization_id="5")
    body = json_format.MessageToJson(event).encode() if as_json else wire.encode(event)
    item = decode(body, wire.JSON_CONTENT_TYPE if as_json else None)
    if full_name in {"events.MentionInserted", "events.MentionUpdated", "events.MentionDeleted"}:
        assert isinstance(item, Change)
        assert item.kind.event_name == full_name.removeprefix("events.")
    elif full_name == "events.TriggerCacheRefresh":
        assert item == CacheRefresh(5, event_id=event.core.id)
    else:
        assert item == wire.Ignored(full_name, known=True)


def test_other_known_event_with_contents_is_ignored() -> None:
    body = body_of(job_pb2.JobFailed(job_id="j1", timestamp_ms="1", job_status="failed"))
    assert decode(body) == wire.Ignored("events.JobFailed", known=True)


@pytest.mark.parametrize("content_type", [None, "", "application/x-protobuf", "application/octet-stream", "Application/X-Protobuf"])
def test_binary_content_types(content_type: str | None) -> None:
    assert isinstance(decode(body_of(wire.refresh_message()), content_type), CacheRefresh)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON;charset=\"UTF-8\""])
def test_json_content_types(content_type: str) -> None:
    assert isinstance(decode(json_of(wire.refresh_message()), content_type), CacheRefresh)


def test_json_with_original_field_names_and_unknown_fields() -> None:
    document = {
        "core": {"id": "e9", "organization_id": "3", "from_the_future": True},
        "data": {
            "@type": "type.googleapis.com/events.MentionUpdated",
            "payload": {"mention_id": 42, "organizationId": "7", "transaction_timestamp": "2024-05-06T07:08:09Z"},
            "new_field": 1,
        },
    }
    change = decode(json.dumps(document).encode(), "application/json")
    assert change == Change(Kind.UPDATED, 42, 7, None, TX.replace(microsecond=0), event_id="e9")


def test_binary_unknown_fields_are_skipped() -> None:
    # Field 15 (varint 1) appended to both the envelope and the payload: a newer producer.
    inner = mention_notification_pb2.MentionInserted(payload=payload()).SerializeToString() + b"\x78\x01"
    body = raw_event("type.googleapis.com/events.MentionInserted", inner) + b"\x78\x01"
    assert isinstance(decode(body), Change)


@pytest.mark.parametrize("prefix", ["type.googleapis.com/", "example.com/schemas/", "/", "https://x.test/a/b/"])
def test_any_type_url_prefix(prefix: str) -> None:
    inner = mention_notification_pb2.MentionInserted(payload=payload()).SerializeToString()
    assert isinstance(decode(raw_event(f"{prefix}events.MentionInserted", inner)), Change)


def test_unknown_type_is_ignored_in_both_forms() -> None:
    assert decode(raw_event("type.googleapis.com/billing.InvoicePaid", b"\x0a\x03abc")) == wire.Ignored(
        "billing.InvoicePaid", known=False
    )
    document = {"core": {"id": "e1"}, "data": {"@type": "type.googleapis.com/billing.InvoicePaid", "amount": 3}}
    assert decode(json.dumps(document).encode(), "application/json") == wire.Ignored("billing.InvoicePaid", known=False)


def test_nested_or_entry_types_count_as_unknown() -> None:
    value = mention_notification_pb2.MentionEmailGenerated.Mention(via="x").SerializeToString()
    assert decode(raw_event("type.googleapis.com/events.MentionEmailGenerated.Mention", value)) == wire.Ignored(
        "events.MentionEmailGenerated.Mention", known=False
    )


# --------------------------------------------------------------------------- refusals


def test_too_large_is_refused_before_parsing() -> None:
    body = body_of(wire.refresh_message())
    assert isinstance(wire.decode(body, None, max_bytes=len(body)), CacheRefresh)
    with pytest.raises(TooLarge, match=f"body of {len(body) + 1} bytes is over the limit of {len(body)} bytes"):
        wire.decode(body + b"\x00", None, max_bytes=len(body))
    with pytest.raises(TooLarge):
        wire.decode(b"\xff" * 100, "text/garbage", max_bytes=10)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/protobuf+json", "json"])
def test_unsupported_content_type(content_type: str) -> None:
    refused = refusal(body_of(wire.refresh_message()), content_type)
    assert isinstance(refused, Undecodable)
    assert refused.reason == f"unsupported content type {content_type!r}"


def test_json_in_another_charset() -> None:
    refused = refusal(json_of(wire.refresh_message()), "application/json; charset=latin-1")
    assert isinstance(refused, Undecodable)
    assert "charset" in refused.reason


def test_truncated_body_is_refused() -> None:
    body = body_of(wire.mention_message(Kind.INSERTED, 42, 7, DATE, TX))
    refused = refusal(body[:-3])
    assert isinstance(refused, Undecodable)
    assert refused.reason.startswith("not a protobuf VtEvent")


def test_every_truncation_is_refused() -> None:
    """Cutting a body anywhere never yields a different change: it is refused."""
    body = body_of(wire.mention_message(Kind.INSERTED, 42, 7, DATE, TX), trace_context={"a": "b"})
    for end in range(len(body)):
        with pytest.raises(Refused):
            decode(body[:end])


def test_any_value_not_of_the_declared_type() -> None:
    refused = refusal(raw_event("type.googleapis.com/events.MentionInserted", b"\x1a\x05\x08"))
    assert isinstance(refused, Undecodable)
    assert refused.reason.startswith("data is not a valid events.MentionInserted")


def test_corrupt_value_of_another_known_type_is_refused_too() -> None:
    assert isinstance(refusal(raw_event("type.googleapis.com/events.JobCreated", b"\x0a\x09short")), Undecodable)


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"{",
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b"\xff\xfe{}",
        b'{"core": 5}',
        b'{"data": {"payload": {}}}',  # no @type
        b'{"data": {"@type": "type.googleapis.com/events.MentionInserted", "payload": {"mentionId": "x"}}}',
        b'{"core": 5, "data": {"@type": "type.googleapis.com/billing.InvoicePaid"}}',  # bad envelope, foreign data
        b"[" * 100_000,
    ],
)
def test_invalid_json_is_undecodable(text: bytes) -> None:
    with pytest.raises(Undecodable):
        wire.decode(text, "application/json", max_bytes=len(text) + 1)


def test_malformed_type_url() -> None:
    refused = refusal(raw_event("events.MentionInserted", b""))
    assert isinstance(refused, Undecodable)
    assert refused.reason == "malformed type URL in data: 'events.MentionInserted'"
    assert isinstance(refusal(raw_event("type.googleapis.com/", b"")), Undecodable)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"", None),
        (wire.encode(core_pb2.VtEvent(core=core_pb2.Core(id="x"))), None),
        (raw_event("", b"\x08\x01"), None),
        (b"{}", "application/json"),
        (b'{"core": {"id": "x"}, "data": {}}', "application/json"),
    ],
)
def test_missing_data(body: bytes, content_type: str | None) -> None:
    refused = refusal(body, content_type)
    assert isinstance(refused, MissingField)
    assert refused.reason == "missing data"


@pytest.mark.parametrize("kind", list(Kind))
def test_missing_payload(kind: Kind) -> None:
    refused = refusal(body_of(MENTION_CLASSES[kind](event="mention_inserted")))
    assert isinstance(refused, MissingField)
    assert refused.reason == "missing payload"


def mention_body(kind: Kind = Kind.INSERTED, **fields: Any) -> bytes:
    return body_of(MENTION_CLASSES[kind](payload=payload(**fields)))


@pytest.mark.parametrize(
    ("kind", "fields", "error", "reason"),
    [
        (Kind.INSERTED, {"mention_id": 0}, MissingField, "missing mention_id"),
        (Kind.DELETED, {"mention_id": 0}, MissingField, "missing mention_id"),
        (Kind.UPDATED, {"mention_id": -1}, OutOfRange, "mention_id out of range: -1 (must be positive)"),
        (Kind.INSERTED, {"organization_id": 0}, MissingField, "missing organization_id"),
        (Kind.UPDATED, {"organization_id": 0}, MissingField, "missing organization_id"),
        (Kind.DELETED, {"organization_id": -3}, OutOfRange, "organization_id out of range: -3 (must be positive)"),
        (Kind.INSERTED, {"transaction_timestamp": ""}, MissingField, "missing transaction_timestamp"),
        (Kind.DELETED, {"transaction_timestamp": ""}, MissingField, "missing transaction_timestamp"),
        (Kind.UPDATED, {"transaction_timestamp": "yesterday"}, BadTimestamp, "unparseable transaction_timestamp: 'yesterday'"),
        (Kind.INSERTED, {"transaction_timestamp": " "}, BadTimestamp, "unparseable transaction_timestamp: ' '"),
        (Kind.INSERTED, {"transaction_timestamp": "1\n2"}, BadTimestamp, "unparseable transaction_timestamp: '1\\n2'"),
        (Kind.INSERTED, {"mention_date": "2024-13-01T00:00:00Z"}, BadTimestamp, "unparseable mention_date: '2024-13-01T00:00:00Z'"),
    ],
)
def test_payload_refusals(kind: Kind, fields: dict[str, Any], error: type[Refused], reason: str) -> None:
    refused = refusal(mention_body(kind, **fields))
    assert type(refused) is error
    assert refused.reason == reason


def test_delete_with_organization_zero_keeps_the_stored_one() -> None:
    change = decode(mention_body(Kind.DELETED, organization_id=0))
    assert isinstance(change, Change)
    assert change.organization_id is None


def test_empty_mention_date_is_none() -> None:
    change = decode(mention_body(Kind.UPDATED, mention_date=""))
    assert isinstance(change, Change)
    assert change.mention_date is None


def test_refusal_reason_stays_short() -> None:
    refused = refusal(mention_body(transaction_timestamp="x" * 10_000))
    assert len(refused.reason) <= 500


@pytest.mark.parametrize(
    "organization_id",
    ["*", "1*", "?", "[1]", " 12", "12 ", "12\n", "0x1F", "1e3", "1_000", "+1", "-1", "0", "007", "١٢", "１２",
     "9223372036854775808", "1" * 5000, "all"],
)
def test_trigger_with_bad_organization_id(organization_id: str) -> None:
    body = raw_event("type.googleapis.com/events.TriggerCacheRefresh", b"", organization_id=organization_id)
    refused = refusal(body)
    assert isinstance(refused, BadOrganizationId)
    assert refused.reason.startswith("organization_id is not a decimal integer")


# --------------------------------------------------------------------------- fuzz


@given(st.binary(max_size=512), st.sampled_from([None, wire.CONTENT_TYPE, "application/json", "text/plain"]))
def test_random_bytes_only_ever_raise_refused(body: bytes, content_type: str | None) -> None:
    try:
        decode(body, content_type)
    except Refused as refused:
        assert "\n" not in refused.reason


def _mutations(body: bytes) -> st.SearchStrategy[bytes]:
    positions = st.integers(min_value=0, max_value=len(body) - 1)
    return st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=4).map(
        lambda edits: bytes(_apply(bytearray(body), edits))
    )


def _apply(buffer: bytearray, edits: list[tuple[int, int]]) -> bytearray:
    for position, value in edits:
        buffer[position] = value
    return buffer


VALID_BODY = body_of(wire.mention_message(Kind.UPDATED, 42, 7, DATE, TX), trace_context={"k": "v"})


@given(_mutations(VALID_BODY))
def test_corrupted_valid_bodies_only_ever_raise_refused(body: bytes) -> None:
    try:
        decode(body)
    except Refused:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
json_data = st.fixed_dictionaries(
    {"@type": st.sampled_from(["type.googleapis.com/events.MentionInserted", "type.googleapis.com/events.TriggerCacheRefresh", "x/y.Z", "", "nope"])},
    optional={"payload": json_values, "event": json_values},
)


@given(st.dictionaries(st.sampled_from(["core", "trace", "baggage", "data", "other"]), json_values | json_data, max_size=4))
def test_random_json_documents_only_ever_raise_refused(document: dict[str, Any]) -> None:
    try:
        decode(json.dumps(document).encode(), "application/json")
    except Refused:
        pass


@given(
    kind=st.sampled_from(list(Kind)),
    mention_id=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    organization_id=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    mention_date=st.text(max_size=40),
    transaction_timestamp=st.text(max_size=40),
)
def test_arbitrary_payloads_give_a_valid_change_or_a_refusal(
    kind: Kind, mention_id: int, organization_id: int, mention_date: str, transaction_timestamp: str
) -> None:
    fields = {
        "mention_id": mention_id,
        "organization_id": organization_id,
        "mention_date": mention_date,
        "transaction_timestamp": transaction_timestamp,
    }
    try:
        change = decode(mention_body(kind, **fields))
    except Refused:
        return
    assert isinstance(change, Change)
    assert change.mention_id == mention_id > 0
    assert change.organization_id == (organization_id or None)
    assert change.transaction_timestamp.tzinfo is UTC


# --------------------------------------------------------------------------- producer side


def test_build_event_fills_core_as_the_seed_says() -> None:
    event = wire.build_event(wire.mention_message(Kind.INSERTED, 1, 2, None, TX), organization_id="2")
    core = event.core
    assert uuid.UUID(core.id).version == 4
    assert re.fullmatch(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} \+0000", core.timestamp)
    assert abs(parse_timestamp(core.timestamp) - datetime.now(UTC)) < timedelta(seconds=5)
    assert core.service_name == socket.gethostname()
    assert core.application_id == "system"
    assert (core.name, core.type, core.organization_id) == ("MentionInserted", "events.MentionInserted", "2")
    assert event.data.type_url == "type.googleapis.com/events.MentionInserted"


def test_build_event_overrides() -> None:
    event = wire.build_event(
        wire.refresh_message(),
        service_name="svc",
        application_id="app",
        user_id="u",
        token_id="t",
        name="n",
        event_type="t2",
        trace_context={"a": "1"},
    )
    core = event.core
    assert (core.service_name, core.application_id, core.user_id, core.token_id, core.name, core.type) == (
        "svc", "app", "u", "t", "n", "t2",
    )
    assert dict(event.trace.trace_context) == {"a": "1"}


def test_ids_are_fresh() -> None:
    assert wire.build_event(wire.refresh_message()).core.id != wire.build_event(wire.refresh_message()).core.id


def test_build_event_refuses_a_trigger_nobody_could_use() -> None:
    with pytest.raises(ValueError, match="not a decimal integer"):
        wire.build_event(wire.refresh_message(), organization_id="*")


def test_encode_is_deterministic() -> None:
    event = wire.build_event(wire.refresh_message(), trace_context={str(i): "v" for i in range(50)})
    copy = core_pb2.VtEvent.FromString(event.SerializeToString())
    assert wire.encode(event) == wire.encode(copy)


def test_routing_key_and_content_type() -> None:
    assert wire.routing_key_for(mention_notification_pb2.MentionDeleted()) == "events.MentionDeleted"
    assert wire.routing_key_for(trigger_pb2.TriggerCacheRefresh()) == "events.TriggerCacheRefresh"
    assert wire.CONTENT_TYPE == "application/x-protobuf"


def test_payload_timestamps_keep_the_seed_format_unless_sub_seconds_matter() -> None:
    whole = TX.replace(microsecond=0)
    message = wire.mention_message(Kind.UPDATED, 1, 2, DATE, whole)
    assert message.payload.mention_date == "Tue, 02 Jan 2024 03:04:05 UTC"
    assert message.payload.transaction_timestamp == "Mon, 06 May 2024 07:08:09 UTC"
    assert wire.mention_message(Kind.UPDATED, 1, 2, None, TX).payload.transaction_timestamp == "2024-05-06T07:08:09.123456Z"


@pytest.mark.parametrize(
    ("kind", "mention_id", "organization_id"),
    [(Kind.INSERTED, 0, 1), (Kind.INSERTED, -1, 1), (Kind.INSERTED, 2**63, 1), (Kind.INSERTED, 1, None),
     (Kind.UPDATED, 1, None), (Kind.UPDATED, 1, 0), (Kind.DELETED, 1, -5)],
)
def test_mention_message_refuses_what_decode_would(kind: Kind, mention_id: int, organization_id: int | None) -> None:
    with pytest.raises(ValueError):
        wire.mention_message(kind, mention_id, organization_id, None, TX)


def test_mention_message_needs_aware_timestamps() -> None:
    with pytest.raises(ValueError):
        wire.mention_message(Kind.INSERTED, 1, 1, None, datetime(2024, 1, 1))
