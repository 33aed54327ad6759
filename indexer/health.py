"""Readiness: ready only while consuming and while every service answered its last call.

A problem is recorded per (service, source): the batch path and the idle probe each clear only
their own, so a probe's ``SELECT 1`` that works cannot hide an ``INSERT`` that keeps failing.
"""

from __future__ import annotations

import threading

BATCH = "batch"
PROBE = "probe"
# Not a dependency but a condition of readiness: a consumer registered on the queue (the broker
# may cancel it, or a session may be reconnecting).
CONSUMER = "consumer"


class Health:
    SERVICES = ("postgres", "redis", "rabbitmq")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # read by the HTTP thread
        self._problems: dict[tuple[str, str], str] = {(name, BATCH): "not connected yet" for name in self.SERVICES}
        self._problems[(CONSUMER, BATCH)] = "no consumer registered on the queue yet"
        self.stopping = False

    def ok(self, service: str, source: str = BATCH) -> None:
        with self._lock:
            self._problems.pop((service, source), None)

    def failing(self, service: str, detail: str, source: str = BATCH) -> None:
        with self._lock:
            self._problems[(service, source)] = detail

    def up(self, service: str) -> bool:
        """Whether ``service`` answered its last call, from the batch path and the probe alike."""
        with self._lock:
            return not any(name == service for name, _ in self._problems)

    def snapshot(self) -> tuple[bool, dict[str, str]]:
        with self._lock:
            problems = {
                service if source == BATCH else f"{service} ({source})": detail
                for (service, source), detail in self._problems.items()
            }
        if self.stopping:
            problems["indexer"] = "shutting down"
        return not problems, problems
