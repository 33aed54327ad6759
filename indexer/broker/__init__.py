"""RabbitMQ, and the only package that imports aio-pika.

``session``: consuming in batches, dead-lettering, acknowledging (the live path);
``producer``: publishing with confirms (``refresh-cache``, ``emit``);
``dead_letters``: the operator's view of the DLQ; ``topology``: what they all declare and share.
The service sees ``Session`` and ``Delivery``, never aio-pika objects, so the apply logic is
testable without a broker.
"""

from .dead_letters import DeadLetter, DeadLetterQueue
from .producer import Unrouted, publish
from .session import Delivery, Session, SessionLost
from .topology import (
    CONNECTION_ERRORS,
    ERROR_HEADER,
    connect,
    declare_topology,
    queue_arguments,
)

__all__ = [
    "CONNECTION_ERRORS",
    "DeadLetter",
    "DeadLetterQueue",
    "Delivery",
    "ERROR_HEADER",
    "Session",
    "SessionLost",
    "Unrouted",
    "connect",
    "declare_topology",
    "publish",
    "queue_arguments",
]
