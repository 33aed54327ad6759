"""RabbitMQ, and the only package that imports aio-pika.

``session``: consuming in batches, dead-lettering, acknowledging (the live path);
``publish``: publishing with confirms (``refresh-cache``, ``emit``);
``dead_letters``: the operator's view of the DLQ; ``topology``: what they all declare and share.
The service sees ``Session`` and ``Delivery``, never aio-pika objects, so the apply logic is
testable without a broker.
"""

from indexer.ingest.dead_letters import DeadLetter, DeadLetterQueue
from indexer.ingest.publish import Unrouted, publish
from indexer.ingest.session import Delivery, Session, SessionLost
from indexer.ingest.topology import (
    CONNECTION_ERRORS,
    ERROR_HEADER,
    connect,
    declare_topology,
    queue_arguments,
)

__all__ = [
    "CONNECTION_ERRORS",
    "ERROR_HEADER",
    "DeadLetter",
    "DeadLetterQueue",
    "Delivery",
    "Session",
    "SessionLost",
    "Unrouted",
    "connect",
    "declare_topology",
    "publish",
    "queue_arguments",
]
