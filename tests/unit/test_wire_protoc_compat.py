"""Bytes made by protoc itself from the .proto sources decode: the codec speaks the wire format of
``proto/events``, not just whatever our own generated classes happen to write."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import grpc_tools

from indexer import wire
from indexer.changes import CacheRefresh, Change, Kind

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = Path(grpc_tools.__file__).resolve().parent / "_proto"  # google/protobuf/any.proto

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


def protoc_encode(text: str) -> bytes:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "--encode=events.VtEvent",
            "-I",
            "proto",
            "-I",
            str(INCLUDE),
            "proto/events/core.proto",
            "proto/events/mention_notification.proto",
            "proto/events/trigger.proto",
        ],
        cwd=ROOT,
        input=text.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def test_protoc_encoded_mention_inserted_decodes() -> None:
    change = wire.decode(protoc_encode(MENTION_INSERTED), "application/x-protobuf", max_bytes=4096)
    assert change == Change(
        kind=Kind.INSERTED,
        mention_id=9007199254740993,  # beyond float precision: int64 all the way through
        organization_id=17,
        mention_date=datetime(2006, 1, 2, 15, 4, 5, tzinfo=timezone.utc),
        transaction_timestamp=datetime(2006, 1, 2, 22, 4, 5, tzinfo=timezone.utc),
        event_id="0f8fad5b-d9cb-469f-a165-70867728950e",
    )
    assert isinstance(change, Change)
    assert change.trace_context == {"uber-trace-id": "abc:def:0:1"}


def test_protoc_encoded_trigger_decodes() -> None:
    item = wire.decode(protoc_encode(TRIGGER), None, max_bytes=4096)
    assert item == CacheRefresh(4242, event_id="t-1")
