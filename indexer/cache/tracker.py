"""Indexing keys that were written into an organization's namespace without the fill helper (docs/caches.md).

An invalidation must delete *every* key of the organization's namespace ``P:{O}:``, including keys
another service wrote with a plain ``SET``, yet never walk the keyspace for one event.  The fill
helper indexes what it writes; ``KeyTracker`` indexes the rest, from keyspace notifications:

* ``notify-keyspace-events`` gets ``K`` (keyspace channels) and ``n`` (new-key events, Redis >= 7)
  added through CONFIG GET/SET.  Flags already set are kept, and ours stay when the tracker stops:
  other indexers sharing the server rely on them.  (GET then SET is not atomic: a CONFIG SET by
  someone else in between is overwritten.)
* A connection of its own, named ``client_name``, PSUBSCRIBEs to ``__keyspace@<db>__:P:{*``.  For
  each ``new`` event on ``P:{<decimal org>}:<rest>`` the key is indexed (track.lua: fill.lua's
  bookkeeping) and the org registered, so invalidate.lua deletes it.  The bookkeeping keys
  (``P:idx:{O}``, ``P:epoch:{O}``, ``P:orgs``) never have that form.
* ``barrier()`` runs before every invalidation.  It sends PING on the subscribed connection; the
  server answers it after every notification queued before it, and the barrier returns once those
  were indexed.  So a key whose SET returned before the invalidation began is deleted by it.  The
  flags are checked at the same time: if someone switched them off, the tracker starts again.
* Starting (the first time, and after a lost connection or lost flags): enable the flags,
  subscribe, then ONE ``SCAN MATCH P:{*`` to adopt keys that existed before (written while the
  indexer was down, or whose notification was lost).  A walk per start or reconnection, never per
  event, and never inside an invalidation: a start runs as a task of its own, begun by ``start()``
  (the invalidator's ``ping``, which waits for it), by a barrier that finds no subscription, or at
  once when the subscription dies.  Until it has succeeded the barrier raises ``Unavailable``, so
  the caller retries, acknowledges nothing meanwhile and reports not-ready.
* A reply that may pass (a BUSY server, a failover: ``errors.is_transient``) is ``Unavailable``;
  the barrier after it tries again.

``INDEXER_TRACK_DIRECT_KEYS``: ``auto`` falls back, with one warning, to the keys the helpers
indexed when the server does not allow this: a command refused for good (NOPERM: no CONFIG, no
channel permission, no SCAN; or an unknown command, e.g. a managed Redis without CONFIG), or
Redis < 7.  ``on`` raises ``ConfigError`` instead; ``off`` never tracks.  Any other error reply
is taken as transient: falling back on it would leave directly written keys uninvalidated until
the process restarts.

On a Redis Cluster, notifications, CONFIG and SCAN are per node: ``cluster_tracker`` runs one
``KeyTracker`` per primary, each on a plain client of its node.

Not covered: a TTL set or lengthened on a key after it was indexed (only key creation is observed), and a key
that existed before and is overwritten (no ``new`` event) while its index expires.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import secrets
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import AbstractConnection

from indexer.cache.client import TIMEOUT_S as _TIMEOUT_S
from indexer.cache.errors import as_unavailable, reply_code
from indexer.cache.keys import data_key_pattern, index_key, parse_data_key, registry_key
from indexer.cache.scripts import TRACK_LUA
from indexer.errors import ConfigError, Unavailable
from indexer.redact import mask_url

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

log = logging.getLogger(__name__)

# INDEXER_TRACK_DIRECT_KEYS: index keys written without the helper (module doc).
TrackMode = Literal["auto", "on", "off"]

_NOTIFY = "notify-keyspace-events"
_FLAGS = "Kn"  # keyspace channel, new-key events (7.0+); never removes a flag
_BATCH = 1000  # keys per indexing round trip, and SCAN COUNT
_QUEUE = 10_000  # events read ahead of indexing; beyond, the server buffers (and may drop us)
_PONG = object()
_GATHER_S = 0.005  # how long new keys wait for more before they are indexed (no barrier waiting)

Tracked = tuple[int, bytes]  # (org, full key name)


class _Lost(Exception):
    """The subscription is gone; the caller retries (a new one is starting in the background)."""


class _Unsupported(Exception):
    """The server cannot give us new-key notifications."""


class _Refused:
    """An error reply read where a pong was due (e.g. BUSY while a script runs)."""

    def __init__(self, error: redis.exceptions.ResponseError) -> None:
        self.error = error


def _refused_for_good(exc: BaseException) -> bool:
    """A reply that says the server will never allow tracking (see the module doc)."""
    if isinstance(exc, _Unsupported):
        return True
    if not isinstance(exc, redis.exceptions.ResponseError):
        return False
    code = reply_code(exc)
    if isinstance(exc, redis.exceptions.NoPermissionError) or code == "NOPERM":
        return True
    text = str(exc).lower()
    return code == "ERR" and ("unknown command" in text or "unknown subcommand" in text)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


class _Subscription:
    """One subscribed connection: a task reading events and pongs, a task indexing them in order."""

    def __init__(
        self,
        conn: AbstractConnection,
        parse: Callable[[bytes], Tracked | None],
        track: Callable[[list[Tracked]], Awaitable[None]],
        lost: Callable[[_Subscription], None],
    ) -> None:
        self.conn = conn
        self.failure: str | None = None
        self._parse = parse
        self._track = track
        self._lost = lost
        self._queue: asyncio.Queue[object] = asyncio.Queue(_QUEUE)
        self._pongs: collections.deque[asyncio.Future[None]] = collections.deque()
        self._send = asyncio.Lock()
        self._tasks = [
            asyncio.create_task(self._read(), name="cache-tracker-read"),
            asyncio.create_task(self._index(), name="cache-tracker-index"),
        ]

    @property
    def alive(self) -> bool:
        return self.failure is None and self.conn.is_connected

    async def ping(self) -> None:
        """Returns once every event the server sent before our PING has been indexed."""
        if not self.alive:  # send_command would silently reconnect, unsubscribed
            self.fail(self.failure or "connection closed")
            raise _Lost(self.failure)
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        async with self._send:
            self._pongs.append(pong)
            try:
                await self.conn.send_command("PING", check_health=False)
            except asyncio.CancelledError:  # a write cut short leaves the stream unusable
                self.fail("PING interrupted", quiet=True)
                raise
            except Exception as exc:
                self.fail(f"PING not sent: {type(exc).__name__}: {exc}")
                raise _Lost(self.failure) from exc
        try:
            await asyncio.wait_for(pong, _TIMEOUT_S)
        except TimeoutError:
            self.fail(f"no answer to PING within {_TIMEOUT_S:g} s")
            raise _Lost(self.failure) from None

    def fail(self, reason: str, *, quiet: bool = False) -> None:
        if self.failure is None:
            self.failure = reason
            if not quiet:
                log.warning("cache key tracking interrupted (%s); it restarts in the background", reason)
            self._lost(self)
        while self._pongs:
            pong = self._pongs.popleft()
            if not pong.done():
                pong.set_exception(_Lost(self.failure))
                pong.exception()  # retrieved: its PING may have given up on it already
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()  # a read cancelled mid-way disconnects the connection

    async def close(self) -> None:
        self.fail("closed", quiet=True)
        await self.conn.disconnect(nowait=True)
        # Bounded: redis-py (8.1) sometimes swallows a cancellation; the loops then stop on
        # ``failure`` once their current command returns.
        await asyncio.wait(self._tasks, timeout=_TIMEOUT_S)

    async def _read(self) -> None:
        try:
            while self.failure is None:
                try:
                    reply = await self.conn.read_response(timeout=math.inf)
                except redis.exceptions.ResponseError as exc:
                    # A complete reply, in order, in place of our PING's pong: the connection is fine.
                    await self._queue.put(_Refused(exc))
                    continue
                kind = reply[0] if isinstance(reply, list) and reply else None
                if kind == b"pmessage" and len(reply) == 4 and reply[3] == b"new":
                    tracked = self._parse(reply[2])
                    if tracked is not None:
                        await self._queue.put(tracked)
                elif kind == b"pong":
                    await self._queue.put(_PONG)
        except Exception as exc:
            self.fail(f"subscription lost: {type(exc).__name__}: {exc}")

    async def _gather(self, items: list[Tracked | object]) -> None:
        """Add what follows the first item, waiting up to ``_GATHER_S`` for more keys while no
        barrier waits: a service filling keys one at a time would otherwise cost a round trip
        each, and a key indexed a little later is still indexed before any barrier returns."""
        deadline = asyncio.get_running_loop().time() + _GATHER_S
        while len(items) < _BATCH and isinstance(items[-1], tuple):
            if not self._queue.empty():
                items.append(self._queue.get_nowait())
                continue
            try:
                async with asyncio.timeout_at(deadline):
                    items.append(await self._queue.get())
            except TimeoutError:
                return

    async def _index(self) -> None:
        try:
            while self.failure is None:
                items = [await self._queue.get()]
                await self._gather(items)
                keys: list[Tracked] = [item for item in items if isinstance(item, tuple)]
                if keys:
                    await self._track(keys)
                    if self.failure is not None:
                        return
                # Only now: every event before these pongs is indexed.
                for item in items:
                    if isinstance(item, tuple) or not self._pongs:
                        continue
                    pong = self._pongs.popleft()
                    if pong.done():
                        continue
                    if isinstance(item, _Refused):
                        pong.set_exception(item.error)
                    else:
                        pong.set_result(None)
        except Exception as exc:
            self.fail(f"indexing failed: {type(exc).__name__}: {exc}")


class Tracking:
    """What a tracker of one server and the tracker of a whole cluster (``cluster_tracker``) both
    hold: the mode, the URL their errors name, the name their subscriptions' connections carry
    (one name for every node of a cluster), the prefix and its registry."""

    def __init__(self, prefix: str, url: str, mode: TrackMode) -> None:
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"track_direct_keys must be auto, on or off, got {mode!r}")
        self.mode = mode
        self.url = url
        self.client_name = f"mention-indexer-keys-{secrets.token_hex(6)}"
        self._prefix = prefix
        self._registry = registry_key(prefix)
        self._disabled = mode == "off"


class KeyTracker(Tracking):
    """Keeps every key of a prefix's namespaces in its organization's index (see the module doc).

    ``client`` is the invalidator's client (CONFIG, SCAN and indexing go through it); the
    subscription gets a connection of its own with the same settings.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        prefix: str,
        url: str,
        mode: TrackMode,
        *,
        register: Callable[[list[int]], Awaitable[None]] | None = None,
        lost: Callable[[], None] | None = None,
    ) -> None:
        """``register`` and ``lost`` are for a node of a Redis Cluster (``cluster_tracker``): the
        registry lives in a slot of its own, maybe on another node, so it is written through
        ``register``; ``lost`` is told when the subscription is lost (the slot map may have changed)."""
        super().__init__(prefix, url, mode)
        self._client = client
        self._script = client.register_script(TRACK_LUA)
        self._db = int(client.connection_pool.connection_kwargs.get("db") or 0)
        self._channel_head = f"__keyspace@{self._db}__:".encode()
        self._pattern = data_key_pattern(prefix)
        self._sub: _Subscription | None = None
        self._windows: list[set[int]] = []
        self._starting: asyncio.Task[None] | None = None
        self._register = register
        self._lost = lost

    @property
    def active(self) -> bool | None:
        """True while tracking, False if off or fallen back, None before the first start."""
        if self._disabled:
            return False
        return True if self._sub is not None and self._sub.alive else None

    async def start(self) -> None:
        """Start tracking unless it runs, and wait for that start (the one SCAN); ``Unavailable``
        or ``ConfigError`` if it fails.  Not for an invalidation: there the barrier only begins a
        start, in the background."""
        if self._disabled or (self._sub is not None and self._sub.alive):
            return
        # A start that ended already is stale (its failure too): this begins another.  Shielded:
        # a caller given up on (a probe's timeout) does not abort the start.
        await asyncio.shield(self._start_in_background())

    async def barrier(self) -> None:
        """Index every key created before this call; ``Unavailable`` if that cannot be ensured,
        among others while tracking is (re)starting."""
        sub = self._running()
        if sub is None:
            return
        try:
            _, flags = await asyncio.gather(sub.ping(), self._flags())
        except _Lost as exc:
            raise Unavailable("redis", self.url, f"cache key tracking: {exc}") from None
        except (redis.exceptions.RedisError, _Unsupported) as exc:
            await self._refused(exc)
            return
        if all(flag in flags for flag in _FLAGS):
            return
        # Keys created meanwhile sent no event: start again (in the background), which adopts them by SCAN.
        sub.fail(f"{_NOTIFY} lost its {_FLAGS} flags (now {flags!r})")
        raise Unavailable("redis", self.url, f"cache key tracking restarts: {_NOTIFY} lost its {_FLAGS} flags")

    async def aclose(self) -> None:
        self._disabled = True
        if self._starting is not None:
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._sub is not None:
            await self._sub.close()
            self._sub = None

    # ---- starting ----

    def _running(self) -> _Subscription | None:
        """The live subscription; None when not tracking.  Otherwise a start is begun (unless one
        runs) and ``Unavailable`` raised: an invalidation never waits for a start's SCAN."""
        if self._disabled:
            return None
        if self._sub is not None and self._sub.alive:
            return self._sub
        failed: BaseException | None = None
        task = self._starting
        if task is not None and task.done():
            self._starting = None
            failed = None if task.cancelled() else task.exception()
            if isinstance(failed, ConfigError):
                raise failed
            if self._disabled:  # fell back
                return None
        self._start_in_background()
        detail = "cache key tracking is starting"
        if failed is not None:
            reason = failed.detail if isinstance(failed, Unavailable) else f"{type(failed).__name__}: {failed}"
            detail += f" (the last attempt failed: {reason})"
        raise Unavailable("redis", self.url, detail)

    def _start_in_background(self) -> asyncio.Task[None]:
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._restart(), name="cache-tracker-start")
            # Its failure is reported by the next barrier or start; never "never retrieved".
            self._starting.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self._starting

    def _subscription_lost(self, sub: _Subscription) -> None:
        """A subscription failed: start a new one at once, so the next barrier need not."""
        if sub is self._sub and not self._disabled:
            self._start_in_background()
            if self._lost is not None:
                self._lost()

    async def _restart(self) -> None:
        old, self._sub = self._sub, None
        if old is not None:
            await old.close()
        try:
            await self._enable_notifications()
            sub = await self._subscribe()
            try:
                await self._adopt_existing()
            except BaseException:
                await sub.close()
                raise
        except (redis.exceptions.RedisError, _Unsupported) as exc:
            await self._refused(exc)
            return
        if self._disabled:  # closed meanwhile (a cancellation swallowed by redis-py)
            await sub.close()
            return
        self._sub = sub

    async def _refused(self, exc: redis.exceptions.RedisError | _Unsupported) -> None:
        """Fall back (or ``ConfigError``) if the server will never allow tracking; else ``Unavailable``."""
        if _refused_for_good(exc):
            await self._impossible(exc)
            return
        raise as_unavailable(self.url, exc) from exc

    async def _impossible(self, exc: Exception) -> None:
        detail = f"{type(exc).__name__}: {exc}"
        if self.mode == "on":
            raise ConfigError(
                f"INDEXER_TRACK_DIRECT_KEYS=on, but Redis at {mask_url(self.url)} does not allow tracking keys "
                f"written directly into the cache namespaces ({detail}); it needs Redis >= 7 and permission for "
                f"CONFIG GET/SET, PSUBSCRIBE to __keyspace@* and SCAN, or set it to auto or off"
            )
        if self._disabled:
            return  # warned already
        self._disabled = True
        if self._sub is not None:
            await self._sub.close()
            self._sub = None
        log.warning(
            "cannot track keys written directly into the cache namespaces (%s): only keys written through "
            "the cache helper will be invalidated",
            detail,
        )

    async def _flags(self) -> str:
        reply = await self._client.config_get(_NOTIFY)
        value = next(iter(reply.values()), None) if isinstance(reply, dict) else None
        if value is None:
            raise _Unsupported(f"the server has no {_NOTIFY} setting")
        return value.decode() if isinstance(value, bytes) else str(value)

    async def _enable_notifications(self) -> None:
        version = str((await self._client.info("server")).get("redis_version", "0"))
        if _version(version) < (7, 0):
            raise _Unsupported(f"Redis {version} has no new-key notifications (7.0 or later needed)")
        for _ in range(3):
            flags = await self._flags()
            missing = "".join(flag for flag in _FLAGS if flag not in flags)
            if not missing:
                return
            log.info("adding %r to the server's %s (was %r)", missing, _NOTIFY, flags)
            await self._client.config_set(_NOTIFY, flags + missing)
        raise Unavailable("redis", self.url, f"{_NOTIFY} keeps losing the {_FLAGS} flags")

    def _connection(self) -> AbstractConnection:
        pool = self._client.connection_pool
        kwargs = {
            name: value
            for name, value in pool.connection_kwargs.items()
            if not name.startswith(("maint_notifications", "orig_"))  # the pool's, not ours
        }
        kwargs.update(
            client_name=self.client_name,
            protocol=2,  # RESP2: PING is answered in order with the events, as ["pong", ""]
            decode_responses=False,
            health_check_interval=0,  # its PING would swallow an event
            socket_timeout=_TIMEOUT_S,  # writes and the handshake; events are awaited without limit
            socket_connect_timeout=kwargs.get("socket_connect_timeout") or _TIMEOUT_S,
        )
        return pool.connection_class(**kwargs)

    async def _subscribe(self) -> _Subscription:
        conn = self._connection()
        try:
            await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            await conn.send_command("PSUBSCRIBE", self._channel_head.decode() + self._pattern, check_health=False)
            reply = await conn.read_response()
            if not (isinstance(reply, list) and reply[:1] == [b"psubscribe"]):
                raise redis.exceptions.ConnectionError(f"unexpected reply to PSUBSCRIBE: {reply!r:.80}")
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        return _Subscription(conn, self._parse_channel, self._track, self._subscription_lost)

    async def _adopt_existing(self) -> None:
        """The one walk of the keyspace, per start (see the module doc)."""
        batch: list[Tracked] = []
        async for key in self._client.scan_iter(match=self._pattern, count=_BATCH):
            if self._disabled:
                raise asyncio.CancelledError  # closed meanwhile (see _restart)
            tracked = self._parse(key.encode() if isinstance(key, str) else key)
            if tracked is not None:
                batch.append(tracked)
            if len(batch) >= _BATCH:
                await self._track(batch)
                batch = []
        if batch:
            await self._track(batch)

    # ---- indexing ----

    def _parse_channel(self, channel: bytes) -> Tracked | None:
        if not channel.startswith(self._channel_head):
            return None
        return self._parse(channel[len(self._channel_head) :])

    def _parse(self, key: bytes) -> Tracked | None:
        """``(org, key)`` for ``P:{<canonical decimal org>}:<anything>``; None for anything else."""
        return parse_data_key(self._prefix, key)

    @contextmanager
    def watching(self) -> Iterator[set[int]]:
        """The organizations whose keys get indexed while the block runs (see
        ``CacheInvalidator.invalidate``: deletes beside the barrier, not after it)."""
        window: set[int] = set()
        self._windows.append(window)
        try:
            yield window
        finally:
            self._windows.remove(window)

    async def _track(self, keys: list[Tracked]) -> None:
        orgs = sorted({org for org, _ in keys})
        # Registered before indexed, as the readers do, so invalidate_all finds every org.
        if self._register is not None:
            await self._register(orgs)
            async with self._client.pipeline(transaction=False) as pipe:
                for org, key in keys:
                    await self._script(keys=[index_key(self._prefix, org), key], client=pipe)
                added = [i for i, positions in enumerate(await pipe.execute()) if positions]
        else:
            # A single server: one script, the registry included (a pipeline of scripts would first
            # ask SCRIPT EXISTS, a round trip more on every key a service fills).
            pairs: list[str | bytes] = []
            for org, key in keys:
                pairs += (index_key(self._prefix, org), key)
            positions = await self._script(keys=[*pairs, self._registry], args=orgs, client=self._client)
            added = [int(position) - 1 for position in positions]
        # Keys new to their index (not the fill helper's) are the only ones a delete may have missed.
        for window in self._windows:
            window.update(keys[i][0] for i in added)
