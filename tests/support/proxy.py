"""A TCP proxy for fault tests: put it between the indexer and one service, then ``cut`` and ``restore``.

The shared services themselves are never stopped (other tests and indexers use them); cutting the
proxy is what the indexer sees of an outage:

* ``cut()`` closes every current connection on both sides with a reset (the peer sees
  ``ECONNRESET`` at once, and the service sees its client go away, so RabbitMQ requeues what was
  unacknowledged) and then, for new connections, either
  - ``"refuse"`` (default): accepts and resets them at once, like a port nobody listens on, or
  - ``"blackhole"``: accepts them and never answers, like a host that stopped responding; they are
    reset on ``restore()``.
* ``cut(half_open=True)`` resets only the client side of current connections and leaves the
  service side open and silent: a partition that the client noticed (its keepalive fired) and the
  service did not (its keepalive is hours by default).  Those are closed by ``close()``.
* ``freeze()`` stops forwarding on current connections, holding the data, and blackholes new
  ones: a service that stopped answering without closing anything (a stalled broker).  TCP
  keepalives cannot see it (the proxy's kernel answers them); only application heartbeats can.
* ``restore()`` forwards new connections again (and the held data of frozen ones).
* ``latency_s`` delays every chunk forwarded, each way (a distant service: slower round trips).

Threaded on purpose: it keeps working while the test's event loop blocks or is busy.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

Mode = Literal["refuse", "blackhole"]
_CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN, so the peer learns at once (and cannot half-read).

    ``shutdown(SHUT_RD)`` first: it wakes a pump thread blocked in ``recv`` on this socket.  Without
    it, Linux defers the real close until that ``recv`` returns, which may be never: the peer is
    not told, and a Postgres backend stays "idle in transaction" holding its row locks.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket, proxy: TcpProxy) -> None:
        self.client = client
        self.upstream = upstream
        self._proxy = proxy
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        for source, target in ((self.client, self.upstream), (self.upstream, self.client)):
            threading.Thread(target=self._pump, args=(source, target), daemon=True, name="proxy-pump").start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    break
                if self._proxy.latency_s:
                    time.sleep(self._proxy.latency_s)
                while not self._proxy.flowing.wait(0.1):
                    if self._closed:
                        return
                target.sendall(data)
        except OSError:
            pass
        self.close(reset=False)

    def close(self, *, reset: bool, half_open: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if half_open:
            self._proxy.orphan(self.upstream)
        for sock in (self.client,) if half_open else (self.client, self.upstream):
            if reset:
                _reset(sock)
            else:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    @property
    def closed(self) -> bool:
        return self._closed


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream``; ``cut``/``restore`` to simulate an outage."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._mode: Mode | None = None  # None: forwarding
        self._pairs: list[_Pair] = []
        self._held: list[socket.socket] = []  # blackholed connections
        self._orphans: list[socket.socket] = []  # service sides of half-open cuts
        self.flowing = threading.Event()  # cleared while frozen
        self.flowing.set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name=f"proxy-{self.port}")
        self.accepted = 0  # connections forwarded so far (a reconnect shows up here)
        self.latency_s = 0.0  # added to every chunk forwarded, each way: a slow network

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or _default_port(parts.scheme))

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (user, password, path kept)."""
        parts = urlsplit(url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def is_cut(self) -> bool:
        return self._mode is not None

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(not pair.closed for pair in self._pairs)

    def cut(self, mode: Mode = "refuse", *, half_open: bool = False) -> None:
        with self._lock:
            self._mode = mode
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close(reset=True, half_open=half_open)

    def orphan(self, upstream: socket.socket) -> None:
        """Keep ``upstream`` open but unread: its pump may still be in ``recv`` on it."""
        with self._lock:
            self._orphans.append(upstream)

    def freeze(self) -> None:
        with self._lock:
            self._mode = "blackhole"
            self.flowing.clear()

    def restore(self) -> None:
        with self._lock:
            self._mode = None
            self.flowing.set()
            held, self._held = self._held, []
        for sock in held:
            _reset(sock)

    def close(self) -> None:
        self._stopping.set()
        self.cut()
        self.restore()
        with self._lock:
            orphans, self._orphans = self._orphans, []
        for sock in orphans:
            _reset(sock)
        self._thread.join(2)
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            client.settimeout(None)
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        with self._lock:
            mode = self._mode
            if mode == "blackhole":
                self._held.append(client)
                return
        if mode == "refuse":
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client, upstream, self)
        with self._lock:
            if self._mode is not None:  # cut while we were connecting upstream
                pair.close(reset=True)
                return
            self._pairs = [p for p in self._pairs if not p.closed]
            self._pairs.append(pair)
            self.accepted += 1
        pair.start()


def _default_port(scheme: str) -> int:
    return {"postgresql": 5432, "postgres": 5432, "redis": 6379, "amqp": 5672}.get(scheme, 0)
