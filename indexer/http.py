"""/healthz (alive), /readyz (consuming, services answering) and /metrics, on a daemon thread.

A thread with the standard library's WSGI server keeps the asyncio loop free of HTTP work and
needs no web framework for three fixed routes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from indexer.health import Health
from indexer.metrics import DEPENDENCIES, Metrics

log = logging.getLogger(__name__)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds would flood the log
        pass


def _app(health: Health, metrics: Metrics) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            ready, _ = health.snapshot()
            metrics.ready.set(1 if ready else 0)
            for dependency in DEPENDENCIES:
                metrics.dependency_up.labels(dependency).set(1 if health.up(dependency) else 0)
            answer: Iterable[bytes] = metrics_app(environ, start_response)
            return answer
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"status":"ok"}']
        if path == "/readyz":
            ready, problems = health.snapshot()
            body = json.dumps({"ready": ready, "problems": problems}).encode()
            start_response("200 OK" if ready else "503 Service Unavailable", [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


class HttpServer:
    def __init__(self, port: int, health: Health, metrics: Metrics, host: str = "0.0.0.0") -> None:
        self._server = make_server(host, port, _app(health, metrics), server_class=_Server, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="indexer-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("health and metrics on port %d", self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
