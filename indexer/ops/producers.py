"""Producer commands: ``refresh-cache`` and ``emit``.  Publish with confirms; succeed only if routed.

Nothing is published that the indexer would dead-letter: ``wire`` refuses such input with
``ValueError``, which becomes a ``ConfigError`` (exit 2) here, before any connection is opened.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from google.protobuf.message import Message

from indexer import ingest as broker
from indexer import tracing
from indexer.changes import Kind
from indexer.config import Settings
from indexer.errors import ConfigError
from indexer.ingest import wire
from indexer.timestamps import format_rfc3339, parse_timestamp


def _publish(settings: Settings, message: Message, organization_id: str) -> str:
    routing_key = wire.routing_key_for(message)
    with tracing.span("publish", routing_key=routing_key):
        try:
            event = wire.build_event(message, organization_id=organization_id, trace_context=tracing.inject())
        except ValueError as exc:
            raise ConfigError(f"--org: {exc}") from None
        asyncio.run(
            broker.publish(
                settings.amqp_url, settings.exchange, routing_key, wire.encode(event), content_type=wire.CONTENT_TYPE
            )
        )
    return event.core.id


def refresh_cache(settings: Settings, org: int | None) -> str:
    event_id = _publish(settings, wire.refresh_message(), "" if org is None else str(org))
    scope = f"organization {org}" if org is not None else "all organizations"
    return (
        f"published TriggerCacheRefresh for {scope} to exchange {settings.exchange} "
        f"(routing key {wire.routing_key_for(wire.refresh_message())}, event {event_id})"
    )


def _timestamp(flag: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def emit(
    settings: Settings,
    kind_name: str,
    mention_id: int,
    org: int,
    mention_date: str | None,
    transaction_timestamp: str | None,
) -> str:
    kind = Kind[kind_name.upper()]
    version = _timestamp("--transaction-timestamp", transaction_timestamp) or datetime.now(UTC)
    date = _timestamp("--mention-date", mention_date)
    try:
        message = wire.mention_message(kind, mention_id, org, date, version)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    event_id = _publish(settings, message, str(org))
    return (
        f"published {kind.event_name} mention {mention_id} organization {org} "
        f"at {format_rfc3339(version)} to exchange {settings.exchange} (event {event_id})"
    )
