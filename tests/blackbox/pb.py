"""A hand-written proto3 encoder for the few `events` messages the tests publish.

Deliberately independent of the product's generated code *and* of the protobuf runtime: field
numbers are 1, 2, 3 … in the order proto/SEED.md lists the fields, the wire format is the
protobuf encoding's.  ``protoc_encode`` (text format → bytes, by protoc itself) and ``Decoder``
(dynamic messages from a protoc descriptor set) are the two other independent paths.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.support.process import ROOT

PROTO_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto" / "events").glob("*.proto"))
TYPE_PREFIX = "type.googleapis.com/"


# ---- wire primitives ---------------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 negatives are ten-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def f_int(number: int, value: int | None) -> bytes:
    return b"" if not value else key(number, 0) + varint(value)


def f_bytes(number: int, value: bytes | str | None, *, keep_empty: bool = False) -> bytes:
    if value is None or (value in ("", b"") and not keep_empty):
        return b""
    data = value.encode() if isinstance(value, str) else value
    return key(number, 2) + varint(len(data)) + data


# ---- the events messages -----------------------------------------------------------------------

CORE_FIELDS = ("id", "name", "timestamp", "type", "service_name", "application_id", "event_id",
               "organization_id", "user_id", "token_id")


def core(**fields: str) -> bytes:
    unknown = set(fields) - set(CORE_FIELDS)
    assert not unknown, unknown
    return b"".join(f_bytes(i, fields.get(name)) for i, name in enumerate(CORE_FIELDS, start=1))


def mention_data(mention_id: int | None = None, organization_id: int | None = None,
                 mention_date: str | None = None, transaction_timestamp: str | None = None) -> bytes:
    return (f_int(1, mention_id) + f_int(2, organization_id) + f_bytes(3, mention_date)
            + f_bytes(4, transaction_timestamp))


def mention_message(payload: bytes | None, event: str = "", type_: str = "") -> bytes:
    """MentionInserted / MentionUpdated / MentionDeleted (same shape): event=1, type=2, payload=3."""
    body = f_bytes(1, event) + f_bytes(2, type_)
    if payload is not None:
        body += f_bytes(3, payload, keep_empty=True)
    return body


def any_(type_name: str, value: bytes, prefix: str = TYPE_PREFIX) -> bytes:
    return f_bytes(1, prefix + type_name) + f_bytes(2, value)


def map_entry(number: int, k: str, v: str) -> bytes:
    return f_bytes(number, f_bytes(1, k) + f_bytes(2, v), keep_empty=True)


def vt_event(core_bytes: bytes | None = None, data: bytes | None = None,
             baggage: dict[str, str] | None = None, trace_context: dict[str, str] | None = None) -> bytes:
    out = b""
    if core_bytes is not None:
        out += f_bytes(1, core_bytes, keep_empty=True)
    if trace_context:
        out += f_bytes(2, b"".join(map_entry(1, k, v) for k, v in trace_context.items()), keep_empty=True)
    for k, v in (baggage or {}).items():
        out += map_entry(3, k, v)
    if data is not None:
        out += f_bytes(4, data, keep_empty=True)
    return out


def mention_event(kind: str, mention_id: int | None, organization_id: int | None = None,
                  transaction_timestamp: str | None = None, mention_date: str | None = None,
                  *, event_id: str = "", baggage: dict[str, str] | None = None) -> bytes:
    """A whole VtEvent body packing ``events.Mention<kind>``."""
    assert kind in ("Inserted", "Updated", "Deleted")
    payload = mention_data(mention_id, organization_id, mention_date, transaction_timestamp)
    return vt_event(
        core(id=event_id or "bb-" + kind, name="Mention" + kind, timestamp="Mon, 02 Jan 2006 15:04:05 -0700",
             service_name="blackbox", application_id="system"),
        any_("events.Mention" + kind, mention_message(payload)),
        baggage=baggage,
    )


def refresh_event(organization_id: str = "") -> bytes:
    return vt_event(core(id="bb-refresh", organization_id=organization_id), any_("events.TriggerCacheRefresh", b""))


# ---- protoc as an encoder and a descriptor source ----------------------------------------------


@functools.cache
def include_dir() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).resolve().parent / "_proto")


def protoc_encode(text: str, message: str = "events.VtEvent") -> bytes:
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"--encode={message}", "-I", "proto", "-I", include_dir(),
         *PROTO_FILES],
        cwd=ROOT, input=text.encode(), capture_output=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


class Decoder:
    """Dynamic messages from a protoc descriptor set, in a pool of their own."""

    def __init__(self) -> None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "events.pb"
            subprocess.run(
                [sys.executable, "-m", "grpc_tools.protoc", "--include_imports", f"--descriptor_set_out={out}",
                 "-I", "proto", "-I", include_dir(), *PROTO_FILES],
                cwd=ROOT, check=True, capture_output=True, timeout=60,
            )
            fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
        self.pool = descriptor_pool.DescriptorPool()
        for file in fds.file:
            self.pool.AddSerializedFile(file.SerializeToString())
        self._factory = message_factory

    def cls(self, full_name: str) -> Any:
        return self._factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))

    def event(self, body: bytes) -> tuple[Any, Any]:
        """(VtEvent, the message packed in data)."""
        event = self.cls("events.VtEvent").FromString(body)
        name = event.data.type_url.rpartition("/")[2]
        return event, self.cls(name).FromString(event.data.value)


@functools.cache
def decoder() -> Decoder:
    return Decoder()
