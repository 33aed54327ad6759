"""Publishing a received message again (a dead letter, a replay) with its properties exactly.

aio-pika rebuilds a received message's properties (``IncomingMessage.properties``) from what
pamqp decoded; publishing them through aio-pika would re-encode the header table with pamqp's
encoder, which narrows doubles (``fieldtable`` says why).  ``ExactProperties`` is pamqp's own
properties class with only the headers written by ``fieldtable``; it is published on the channel
under aio-pika (``get_underlay_channel``), whose ``basic_publish`` takes a properties object.
Confirms and returns work as for any publish on that channel.

One property is not ours to keep: aiormq gives a message without ``message_id`` a random one
(it pairs returns with publishes by it), so a copy of such a message carries a ``message_id``
its original did not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aio_pika
from pamqp.commands import Basic

from indexer.ingest.fieldtable import encode_table

# Properties the broker would act on again (expiration) or refuse from another user (user_id):
# a copy carries them as headers instead.
MOVED_TO_HEADERS = {"expiration": "x-original-expiration", "user_id": "x-original-user-id"}
# Headers the broker adds to a delivery, not parts of the message: a quorum queue counts
# deliveries itself and would overwrite a copied count anyway.
DELIVERY_ANNOTATIONS = frozenset({"x-delivery-count"})


def _message_headers(properties: Basic.Properties) -> dict[str, Any]:
    return {k: v for k, v in (properties.headers or {}).items() if k not in DELIVERY_ANNOTATIONS}


class ExactProperties(Basic.Properties):
    """Basic properties whose header table is encoded by ``fieldtable.encode_table``."""

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers":
            return encode_table(value)
        return bytes(super().encode_property(name, value))


def copy_of(properties: Basic.Properties, headers: Mapping[str, Any], **changes: Any) -> ExactProperties:
    """``properties`` with ``headers`` in place of theirs and ``changes`` applied."""
    values = {name: getattr(properties, name) for name in Basic.Properties.__slots__}
    values.update(changes, headers=dict(headers))
    return ExactProperties(**values)


def dead_letter_properties(
    received: Basic.Properties, extra_headers: Mapping[str, Any], *, keep_headers: bool = True
) -> ExactProperties:
    """The properties of a dead letter of a message that had ``received``: its own (headers too,
    unless ``keep_headers`` is false), persistent, with expiration and user id moved into headers,
    plus ``extra_headers``."""
    headers = _message_headers(received) if keep_headers else {}
    if received.expiration:  # the wire's own text, milliseconds
        headers[MOVED_TO_HEADERS["expiration"]] = received.expiration
    if received.user_id:
        headers[MOVED_TO_HEADERS["user_id"]] = received.user_id
    headers.update(extra_headers)
    return copy_of(received, headers, expiration=None, user_id=None, delivery_mode=2)


def replay_properties(message: aio_pika.abc.AbstractIncomingMessage, dead_letter_headers: set[str]) -> ExactProperties:
    """The properties of a dead letter's replay: the original's again, as far as we kept them."""
    received = message.properties
    headers = {k: v for k, v in _message_headers(received).items() if k not in dead_letter_headers}
    expiration = headers.pop(MOVED_TO_HEADERS["expiration"], None)
    headers.pop(MOVED_TO_HEADERS["user_id"], None)  # the broker refuses a user id not ours
    return copy_of(received, headers, expiration=str(expiration) if expiration else None, delivery_mode=2)


async def publish(
    channel: aio_pika.abc.AbstractChannel,
    body: bytes,
    properties: ExactProperties,
    routing_key: str,
    exchange: str = "",
) -> None:
    """Publish with ``mandatory``; raises as ``basic_publish`` does (returned, nacked, closed)."""
    underlay = await channel.get_underlay_channel()
    await underlay.basic_publish(
        body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=True
    )
