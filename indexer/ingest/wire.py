"""The codec between AMQP message bodies and changes (docs/wire-format.md).  Pure logic, no I/O.

Consumer side: ``decode`` turns a body and its content type into a ``Change``, a ``CacheRefresh``
or ``Ignored``, or raises a ``Refused`` subclass whose ``reason`` goes into the dead-letter header.

* Dispatch is on the type URL inside ``VtEvent.data`` (any prefix, then ``/events.<Name>``), never
  on the routing key.
* A known message of the ``events`` package that is not ours, or a type we have no schema for, is
  ``Ignored``: it is a valid event of another kind.  The contents of known types are parsed (so a
  corrupt one is refused, in binary and JSON alike); unknown types cannot be, and are not.
* JSON (proto3 JSON form): ``json_format`` cannot parse an ``Any`` whose ``@type`` it has no schema
  for, so such an event is read without its ``data`` body and then ignored like its binary twin;
  the rest of the envelope must still be valid.  Unknown fields are skipped in both forms so that a
  producer on a newer schema is not dead-lettered.
* Protobuf's parser accepts many random byte strings as a message full of unknown fields; such
  bodies end up refused as "missing data" (or with a bad type URL), not silently ignored.

Producer side: ``mention_message`` / ``refresh_message`` build the payload, ``build_event`` wraps it
in a ``VtEvent`` with ``Core`` filled as the seed describes, ``encode`` serializes it.
"""

from __future__ import annotations

import functools
import importlib
import json
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from indexer.changes import CacheRefresh, Change, Kind
from indexer.errors import BadOrganizationId, BadTimestamp, MissingField, OutOfRange, Refused, TooLarge, Undecodable
from indexer.events import core_pb2, mention_notification_pb2, trigger_pb2
from indexer.ids import InvalidId, check_id, parse_id
from indexer.timestamps import format_rfc1123, format_rfc1123z, format_rfc3339, parse_timestamp

CONTENT_TYPE = "application/x-protobuf"
JSON_CONTENT_TYPE = "application/json"
_BINARY_CONTENT_TYPES = frozenset({"", CONTENT_TYPE, "application/octet-stream"})

# The generated modules of the nine seed files, one per file of proto/events/.
SEED_FILES = "authentication core engine example_event job mention_notification notification task trigger".split()
SEED_MODULES = tuple(importlib.import_module(f"indexer.events.{name}_pb2") for name in SEED_FILES)
# Every top-level message of the nine seed files, by full name.  Nested and map-entry types are
# left out on purpose: nobody sends them as an event, so they count as unknown.
_MESSAGES: dict[str, type[Message]] = {
    descriptor.full_name: getattr(module, name)
    for module in SEED_MODULES
    for name, descriptor in module.DESCRIPTOR.message_types_by_name.items()
}
_KINDS: dict[str, Kind] = {f"events.{kind.event_name}": kind for kind in Kind}
_REFRESH = trigger_pb2.TriggerCacheRefresh.DESCRIPTOR.full_name

MentionMessage = (
    mention_notification_pb2.MentionInserted
    | mention_notification_pb2.MentionUpdated
    | mention_notification_pb2.MentionDeleted
)
_MENTION_CLASSES: dict[Kind, type[MentionMessage]] = {
    Kind.INSERTED: mention_notification_pb2.MentionInserted,
    Kind.UPDATED: mention_notification_pb2.MentionUpdated,
    Kind.DELETED: mention_notification_pb2.MentionDeleted,
}


@dataclass(frozen=True, slots=True)
class Ignored:
    """A valid event of a type the indexer does not act on; acknowledged and counted.

    ``type_name`` comes from the producer's type URL: use it as a metric label only when
    ``known`` (a message of the seed), or the label set is unbounded.
    """

    type_name: str
    known: bool


Decoded = Change | CacheRefresh | Ignored


# --------------------------------------------------------------------------- consumer side


def decode(body: bytes, content_type: str | None, *, max_bytes: int) -> Decoded:
    """Decode one AMQP body; raise a ``Refused`` subclass when it cannot be used."""
    if len(body) > max_bytes:  # before any parsing, so an oversized body costs nothing
        raise TooLarge(len(body), max_bytes)
    media_type, charset = _media_type(content_type)
    if media_type in _BINARY_CONTENT_TYPES:
        event = _parse_binary(body)
    elif media_type == JSON_CONTENT_TYPE:
        if charset not in (None, "utf-8", "utf8"):
            raise Undecodable(f"unsupported JSON charset {charset!r}: JSON is UTF-8")
        event = _parse_json(body)
    else:
        raise Undecodable(f"unsupported content type {content_type!r}")
    try:
        return _interpret(event)
    except Refused as refusal:
        refusal.event_id = event.core.id  # for the dead letter's log line
        raise


def parse_organization_id(text: str) -> int | None:
    """``Core.organization_id`` of a TriggerCacheRefresh: "" → None (all), else a positive int64.

    Anything else (signs, spaces, leading zeros, globs, hex, non-ASCII digits) is refused: the value
    ends up in a Redis key and must never widen it.
    """
    if text == "":
        return None
    try:
        return parse_id(text)
    except InvalidId:
        raise BadOrganizationId(text) from None


@functools.lru_cache(maxsize=64)  # a queue sees a handful of distinct content types
def _media_type(content_type: str | None) -> tuple[str, str | None]:
    """``"application/json; charset=UTF-8"`` → ``("application/json", "utf-8")``."""
    if not content_type:
        return "", None
    media_type, *parameters = content_type.split(";")
    charset = None
    for parameter in parameters:
        key, _, value = parameter.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media_type.strip().lower(), charset


def _parse_binary(body: bytes) -> core_pb2.VtEvent:
    try:
        return core_pb2.VtEvent.FromString(body)
    except (DecodeError, RecursionError) as exc:
        raise Undecodable(f"not a protobuf VtEvent: {exc}") from None


def _parse_json(body: bytes) -> core_pb2.VtEvent:
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Undecodable(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise Undecodable("JSON body is not an object")
    data = document.get("data")
    foreign_type_url = None
    if isinstance(data, dict) and isinstance(data.get("@type"), str):
        if _MESSAGES.get(_type_name(data["@type"])) is None:
            # json_format would fail on a type it has no schema for; read the envelope alone.
            foreign_type_url = data["@type"]
            document = {key: value for key, value in document.items() if key != "data"}
    try:
        event = json_format.ParseDict(document, core_pb2.VtEvent(), ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise Undecodable(f"not a VtEvent in proto3 JSON form: {exc}") from None
    if foreign_type_url is not None:
        event.data.type_url = foreign_type_url
    return event


def _type_name(type_url: str) -> str:
    return type_url.rpartition("/")[2]


def _interpret(event: core_pb2.VtEvent) -> Decoded:
    type_url = event.data.type_url
    if not type_url:
        raise MissingField("data")
    _, slash, name = type_url.rpartition("/")
    if not slash or not name:
        raise Undecodable(f"malformed type URL in data: {type_url!r}")
    message_class = _MESSAGES.get(name)
    if message_class is None:
        return Ignored(name, known=False)
    try:
        message = message_class.FromString(event.data.value)
    except (DecodeError, RecursionError) as exc:
        raise Undecodable(f"data is not a valid {name}: {exc}") from None
    kind = _KINDS.get(name)
    if kind is not None:
        return _change(kind, message, event)  # type: ignore[arg-type]
    if name == _REFRESH:
        return CacheRefresh(parse_organization_id(event.core.organization_id), event_id=event.core.id)
    return Ignored(name, known=True)


def _change(kind: Kind, message: MentionMessage, event: core_pb2.VtEvent) -> Change:
    # Each field is read once: every read of a protobuf field builds a Python value anew.
    if not message.HasField("payload"):
        raise MissingField("payload")
    payload = message.payload
    mention_id, organization, transaction_timestamp = (
        payload.mention_id,
        payload.organization_id,
        payload.transaction_timestamp,
    )
    if mention_id == 0:  # proto3 cannot tell 0 from unset, and 0 is no mention's id
        raise MissingField("mention_id")
    if mention_id < 0:
        raise OutOfRange("mention_id", mention_id, "positive")
    if organization < 0:
        raise OutOfRange("organization_id", organization, "positive")
    if organization == 0 and kind is not Kind.DELETED:
        # A Delete may leave the organization out (the stored one is kept); nothing else may.
        raise MissingField("organization_id")
    if not transaction_timestamp:
        raise MissingField("transaction_timestamp")
    mention_date = payload.mention_date
    trace_context = event.trace.trace_context
    return Change(
        kind=kind,
        mention_id=mention_id,
        organization_id=organization or None,
        mention_date=_timestamp("mention_date", mention_date) if mention_date else None,
        transaction_timestamp=_timestamp("transaction_timestamp", transaction_timestamp),
        event_id=event.core.id,
        trace_context=dict(trace_context) if trace_context else {},
    )


def _timestamp(field: str, text: str) -> datetime:
    try:
        return parse_timestamp(text)
    except ValueError:
        raise BadTimestamp(field, text) from None


# --------------------------------------------------------------------------- producer side


def mention_message(
    kind: Kind,
    mention_id: int,
    organization_id: int | None,
    mention_date: datetime | None,
    transaction_timestamp: datetime,
) -> MentionMessage:
    """The MentionInserted/Updated/Deleted for one change; ``ValueError`` for what ``decode`` would refuse.

    Timestamps are written with ``format_wire_timestamp``.  ``event`` and ``type`` stay empty:
    the seed does not say what they hold and nothing reads them.
    """
    check_id(mention_id, "mention_id")
    if organization_id is None:
        if kind is not Kind.DELETED:
            raise ValueError(f"{kind.event_name} needs an organization_id")
    else:
        check_id(organization_id, "organization_id")
    payload = mention_notification_pb2.MentionModifiedData(
        mention_id=mention_id,
        organization_id=organization_id or 0,
        mention_date=format_wire_timestamp(mention_date) if mention_date is not None else "",
        transaction_timestamp=format_wire_timestamp(transaction_timestamp),
    )
    return _MENTION_CLASSES[kind](payload=payload)


def refresh_message() -> trigger_pb2.TriggerCacheRefresh:
    """The (empty) TriggerCacheRefresh; its organization goes in ``Core.organization_id``."""
    return trigger_pb2.TriggerCacheRefresh()


def format_wire_timestamp(moment: datetime) -> str:
    """A payload timestamp: RFC1123 (``… UTC``) for whole seconds, else RFC3339 with microseconds.

    RFC1123 is what the seed documents for these fields, so consumers written against the seed
    keep working; but it has no sub-second part, and two changes in the same second would then be
    ordered by the tie-break instead of by time, so sub-second values use RFC3339, which every
    consumer of this project accepts.
    """
    return format_rfc3339(moment) if moment.microsecond else format_rfc1123(moment)


def build_event(
    message: Message,
    *,
    organization_id: str = "",
    service_name: str | None = None,
    application_id: str = "system",
    user_id: str = "",
    token_id: str = "",
    name: str | None = None,
    event_type: str | None = None,
    trace_context: Mapping[str, str] | None = None,
) -> core_pb2.VtEvent:
    """Wrap ``message`` in a VtEvent with ``Core`` filled the way the seed describes.

    ``id`` a fresh UUID v4, ``timestamp`` now in RFC1123Z, ``service_name`` the host name unless
    given, ``application_id`` "system" unless given.  ``name`` defaults to the message's name
    (``MentionInserted``) and ``type`` to its full protobuf name (``events.MentionInserted``), the
    same string as the routing key.
    """
    descriptor = message.DESCRIPTOR
    if descriptor.full_name == _REFRESH:
        try:  # never publish what every consumer would refuse
            parse_organization_id(organization_id)
        except BadOrganizationId as exc:
            raise ValueError(exc.reason) from None
    event = core_pb2.VtEvent(
        core=core_pb2.Core(
            id=str(uuid.uuid4()),
            name=descriptor.name if name is None else name,
            timestamp=format_rfc1123z(datetime.now(UTC)),
            type=descriptor.full_name if event_type is None else event_type,
            service_name=socket.gethostname() if service_name is None else service_name,
            application_id=application_id,
            organization_id=organization_id,
            user_id=user_id,
            token_id=token_id,
        ),
    )
    if trace_context:
        event.trace.trace_context.update(trace_context)
    event.data.Pack(message)
    return event


def encode(event: core_pb2.VtEvent) -> bytes:
    """The message body; deterministic so that equal events give equal bytes."""
    return event.SerializeToString(deterministic=True)


def routing_key_for(message: Message) -> str:
    """``events.MentionInserted``: the message's full protobuf name."""
    return str(message.DESCRIPTOR.full_name)


def message_class(full_name: str) -> type[Message] | None:
    """The generated class of a top-level message of the seed, e.g. ``events.JobCreated``."""
    return _MESSAGES.get(full_name)
