"""Bytes made by protoc itself from the .proto sources decode: the codec speaks the wire format of
``proto/events``, not just whatever our own generated classes happen to write."""

from __future__ import annotations

from indexer.changes import CacheRefresh, Change, Kind
from indexer.ingest import wire
from tests.blackbox.pb import protoc_encode  # protoc --encode over proto/events
from tests.support.clock import utc

MENTION_INSERTED = """
core {
  id: "0f8fad5b-d9cb-469f-a165-70867728950e"
  name: "MentionInserted"
  timestamp: "Mon, 02 Jan 2006 15:04:05 -0700"
  service_name: "producer-1"
  application_id: "system"
}
trace {
  trace_context { key: "uber-trace-id" value: "abc:def:0:1" }
}
baggage { key: "tenant" value: "acme" }
data {
  [type.googleapis.com/events.MentionInserted] {
    event: "mention_inserted"
    payload {
      mention_id: 9007199254740993
      organization_id: 17
      mention_date: "Mon, 02 Jan 2006 15:04:05 UTC"
      transaction_timestamp: "Mon, 02 Jan 2006 15:04:05 -0700"
    }
  }
}
"""

TRIGGER = """
core { id: "t-1" organization_id: "4242" }
data { [type.googleapis.com/events.TriggerCacheRefresh] {} }
"""


def test_protoc_encoded_mention_inserted_decodes() -> None:
    change = wire.decode(protoc_encode(MENTION_INSERTED), "application/x-protobuf", max_bytes=4096)
    assert change == Change(
        kind=Kind.INSERTED,
        mention_id=9007199254740993,  # beyond float precision: int64 all the way through
        organization_id=17,
        mention_date=utc(2006, 1, 2, 15, 4, 5),
        transaction_timestamp=utc(2006, 1, 2, 22, 4, 5),
        event_id="0f8fad5b-d9cb-469f-a165-70867728950e",
    )
    assert isinstance(change, Change)
    assert change.trace_context == {"uber-trace-id": "abc:def:0:1"}


def test_protoc_encoded_trigger_decodes() -> None:
    item = wire.decode(protoc_encode(TRIGGER), None, max_bytes=4096)
    assert item == CacheRefresh(4242, event_id="t-1")
