"""Readiness: ready only while consuming and while every service answered its last call."""

from __future__ import annotations

import threading


class Health:
    SERVICES = ("postgres", "redis", "rabbitmq")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # read by the HTTP thread
        self._problems: dict[str, str] = {name: "not connected yet" for name in self.SERVICES}
        self.stopping = False

    def ok(self, service: str) -> None:
        with self._lock:
            self._problems.pop(service, None)

    def failing(self, service: str, detail: str) -> None:
        with self._lock:
            self._problems[service] = detail

    def snapshot(self) -> tuple[bool, dict[str, str]]:
        with self._lock:
            problems = dict(self._problems)
        if self.stopping:
            problems["indexer"] = "shutting down"
        return not problems, problems
