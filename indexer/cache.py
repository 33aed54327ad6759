"""Per-organization Redis caches (SPEC §7): key layout, invalidation, and the reader-side helper.

Key layout, for prefix ``P`` and organization ``O`` (decimal):

=====================  ===================================================================
``P:{O}:<key>``        a cached value; written through ``get_or_fill``, or directly by others
``P:idx:{O}``          set of the full names of O's cached keys: what invalidation deletes
``P:epoch:{O}``        O's epoch: moved on by every invalidation; a fill stores only if it
                       is unchanged since before the value was loaded
``P:orgs``             set of organization ids that may have cached keys (``invalidate_all``)
=====================  ===================================================================

The ``{O}`` hash tag puts an organization's data, index and epoch in one Redis Cluster slot, so
each Lua script touches one slot; the registry is in a slot of its own and written by separate
calls.  Invalidation deletes the members of one index: O(that organization's keys), never a
SCAN or KEYS of the keyspace, and never a key outside ``P:{O}:``.

Keys written into ``P:{O}:`` without this helper (a plain SET by another service) are indexed too,
by the invalidator's key tracker (``cache_tracker``: keyspace notifications, plus one SCAN of
``P:{*`` when it starts or reconnects, in a task of its own, never per event nor inside an
invalidation), and each invalidation first waits until every key created before it is indexed.
Where the server does not allow that (``INDEXER_TRACK_DIRECT_KEYS``), only keys written through the
helper are deleted.

Why a read can never return data older than an acknowledged commit C (the indexer runs: commit C,
then ``invalidate``, then ack):

* ``invalidate`` atomically deletes every indexed key and moves the epoch on.
* ``get_or_fill`` reads the epoch and the value in one atomic step, and serves a value only if its
  key is in the index.  On a miss it loads from the database, then a fill script stores the value
  only if the epoch is still the one read before loading.
* A value served after the invalidation was therefore stored after it (anything stored before
  was deleted), by a fill whose epoch is the post-invalidation one, so its loading started after
  the invalidation, hence after C.  A value returned on a miss was loaded after the read began.
  (A key written directly is served once the tracker has indexed it: it too was written after
  the invalidation, but its freshness is its writer's affair, not guarded by the epoch.)

Eviction: epochs start at a random value, so an evicted and re-created epoch never matches one an
in-flight fill holds; a value whose index was evicted is not served.  Only ``invalidate_all`` relies
on a key surviving eviction (the registry); run the cache with ``noeviction`` or a ``volatile-*``
policy for that guarantee.

Values are bytes: a loader may return ``str`` (stored UTF-8 encoded), and every value comes back
as ``bytes``.  Clients passed in must use ``decode_responses=False``.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal, Self

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.backoff
import redis.exceptions
import redis.retry

from .errors import Unavailable

if TYPE_CHECKING:
    from .cache_tracker import KeyTracker
    from .config import Settings

log = logging.getLogger(__name__)

# Same forbidden characters as INDEXER_CACHE_PREFIX (config): a brace would move the hash tag.
_PREFIX_FORBIDDEN = frozenset("{}*?[]\\ \t\r\n")
_MAX_ORG = 2**63 - 1  # bigint, like organization_id in the read model
_MAX_KEY_BYTES = 1024
_ORGS_PER_PIPELINE = 500  # bounds the size of one round trip in invalidate_all
_TIMEOUT_S = 5.0
_HEALTH_CHECK_INTERVAL_S = 30

# Failures worth retrying.  OOM and READONLY (failover in progress) pass once the server recovers.
_TRANSIENT = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError and AuthenticationError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
)

# Error replies, by their code (the reply's first word), that pass once the server recovers: a
# long script or a blocking command (BUSY), a failed RDB save (MISCONF), too few replicas
# (NOREPLICAS), a failover or resharding (TRYAGAIN, CLUSTERDOWN, MASTERDOWN), a dataset loading
# (LOADING), a read-only replica (READONLY), memory full (OOM).  redis-py raises most of them as a
# plain ResponseError.  Every other reply stays an error that is not retried, NOPERM included:
# an ACL that forbids the invalidator its commands is a configuration to fix, and the service
# stopping on it says so louder than an endless not-ready (nothing is acknowledged either way).
TRANSIENT_REPLIES = frozenset(
    {"BUSY", "MISCONF", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "LOADING", "READONLY", "OOM"}
)
# How redis-py rewrites the message of an error raised inside a pipeline.
_IN_PIPELINE = re.compile(r"Command # \d+ \(.*?\) of pipeline caused error: \(?['\"]?", re.DOTALL)


def _lua(name: str) -> str:
    return files(__package__).joinpath("cache_scripts", f"{name}.lua").read_text(encoding="utf-8")


READ_LUA = _lua("read")
FILL_LUA = _lua("fill")
INVALIDATE_LUA = _lua("invalidate")
TRACK_LUA = _lua("track")

# INDEXER_TRACK_DIRECT_KEYS: index keys written without the helper (cache_tracker module doc).
TrackMode = Literal["auto", "on", "off"]


# ---- key layout ---------------------------------------------------------------------------------


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix or _PREFIX_FORBIDDEN & set(prefix):
        raise ValueError(f"cache prefix must be non-empty, without braces, globs or spaces: {prefix!r}")
    return prefix


def check_org(org: int) -> int:
    # bool is an int, but True is never an organization.
    if not isinstance(org, int) or isinstance(org, bool):
        raise TypeError(f"organization id must be an int, got {type(org).__name__}")
    if not 0 <= org <= _MAX_ORG:
        raise ValueError(f"organization id out of range 0..2^63-1: {org}")
    return org


def check_key(key: str) -> str:
    """A key is the part after ``P:{O}:``; any printable text, the helper adds the rest."""
    if not isinstance(key, str):
        raise TypeError(f"cache key must be a str, got {type(key).__name__}")
    if not key or len(key.encode()) > _MAX_KEY_BYTES:
        raise ValueError(f"cache key must be 1 to {_MAX_KEY_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError(f"cache key contains a control character: {key!r}")
    return key


def namespace(prefix: str, org: int) -> str:
    """``P:{O}:``, the start of every cached key of ``org``."""
    return f"{check_prefix(prefix)}:{{{check_org(org)}}}:"


def data_key(prefix: str, org: int, key: str) -> str:
    return namespace(prefix, org) + check_key(key)


def index_key(prefix: str, org: int) -> str:
    return f"{check_prefix(prefix)}:idx:{{{check_org(org)}}}"


def epoch_key(prefix: str, org: int) -> str:
    return f"{check_prefix(prefix)}:epoch:{{{check_org(org)}}}"


def registry_key(prefix: str) -> str:
    return f"{check_prefix(prefix)}:orgs"


def _fresh_epoch() -> str:
    # Random start (see module doc, eviction); 2^62 leaves INCR room before int64 overflow.
    return str(secrets.randbelow(2**62) + 1)


def _ttl_ms(ttl_s: float) -> int:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0 <= ttl_s < math.inf:
        raise ValueError(f"ttl_s must be a finite number >= 0 (0 = no expiry), got {ttl_s!r}")
    return math.ceil(ttl_s * 1000)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a cache loader must return bytes or str, got {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class _Entry:
    """The keys one get_or_fill call works on; building it validates the arguments."""

    registry: str
    org: int
    slot_keys: tuple[str, str, str]  # epoch, index, data: one slot
    ttl_ms: int

    @classmethod
    def of(cls, prefix: str, org: int, key: str, ttl_s: float) -> _Entry:
        keys = (epoch_key(prefix, org), index_key(prefix, org), data_key(prefix, org, key))
        return cls(registry_key(prefix), org, keys, _ttl_ms(ttl_s))


# ---- connections and errors ---------------------------------------------------------------------


def _options() -> dict[str, Any]:
    # No retries inside: the caller retries with backoff and must see the failure to stop acking.
    return {
        "socket_connect_timeout": _TIMEOUT_S,
        "socket_timeout": _TIMEOUT_S,
        "health_check_interval": _HEALTH_CHECK_INTERVAL_S,
    }


def _describe(client: redis.Redis | redis.asyncio.Redis) -> str:
    """A URL for error messages, built from a client's settings; it carries no password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def reply_code(exc: redis.exceptions.ResponseError) -> str:
    """The code of an error reply (``BUSY``, ``ERR``, ``NOPERM``...), also of one raised inside a
    pipeline; ``ERR`` where none can be told."""
    code = getattr(exc, "status_code", None)  # redis-py >= 6 strips the codes it knows from the text
    if code:
        return str(code)
    text = str(exc.args[0]) if exc.args else ""
    annotated = _IN_PIPELINE.match(text)
    if annotated:
        text = text[annotated.end() :]
    word = text.split(" ", 1)[0]
    return word if word.isascii() and word.isalpha() and word.isupper() else "ERR"


def is_transient(exc: BaseException) -> bool:
    """Whether a redis-py error may pass by itself (a connection lost, a server busy or failing over)."""
    if isinstance(exc, (*_TRANSIENT, redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and reply_code(exc) in TRANSIENT_REPLIES


def as_unavailable(url: str, exc: BaseException) -> Unavailable:
    return Unavailable("redis", url, f"{type(exc).__name__}: {exc}")


@contextmanager
def _unavailable(url: str) -> Iterator[None]:
    """Transient failures (``is_transient``) as ``Unavailable``; anything else propagates."""
    try:
        yield
    except redis.exceptions.RedisError as exc:
        if is_transient(exc):
            raise as_unavailable(url, exc) from exc
        raise


# ---- reader side --------------------------------------------------------------------------------


class CacheReader:
    """Reads and fills a prefix's caches for services that read the read model (synchronous).

    Constructed from a URL it owns its client (``close`` closes it); a client passed in stays the
    caller's.
    """

    def __init__(self, client: redis.Redis | str, prefix: str, *, ttl_s: float = 3600) -> None:
        self._prefix = check_prefix(prefix)
        _ttl_ms(ttl_s)
        self.ttl_s = ttl_s
        if isinstance(client, str):
            self.url = client
            self._owned = True
            self._client = redis.Redis.from_url(
                client, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), **_options()
            )
        else:
            self.url = _describe(client)
            self._owned = False
            self._client = client
        self._read = self._client.register_script(READ_LUA)
        self._fill = self._client.register_script(FILL_LUA)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(settings.redis_url, settings.cache_prefix, ttl_s=settings.cache_ttl_s)

    def get_or_fill(self, org: int, key: str, loader: Callable[[], bytes | str], *, ttl_s: float | None = None) -> bytes:
        """The cached value of ``P:{org}:key``; on a miss ``loader()`` (reading the database) gives
        it and it is stored, unless an invalidation ran meanwhile.  Raises ``Unavailable`` if Redis
        cannot be read; a failure to store after loading only logs (the value is still correct)."""
        entry = _Entry.of(self._prefix, org, key, self.ttl_s if ttl_s is None else ttl_s)
        with _unavailable(self.url):
            epoch, value = self._read(keys=entry.slot_keys, args=[_fresh_epoch()])
            if value is not None:
                return _as_bytes(value)
            # Registered before the fill, so invalidate_all finds every org that has keys.
            self._client.sadd(entry.registry, entry.org)
        value = _as_bytes(loader())
        try:
            with _unavailable(self.url):
                self._fill(keys=entry.slot_keys, args=[epoch, value, entry.ttl_ms])
        except Unavailable as exc:
            log.warning("cache fill skipped: %s", exc)
        return value

    def close(self) -> None:
        if self._owned:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _async_client(client: redis.asyncio.Redis | str) -> tuple[redis.asyncio.Redis, str, bool]:
    """(client, URL for messages, whether we own and must close it); no retries inside redis-py:
    the caller's policy decides, and a hidden retry would stretch every outage report."""
    if isinstance(client, str):
        retry = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0)
        return redis.asyncio.Redis.from_url(client, retry=retry, **_options()), client, True
    return client, _describe(client), False


class AsyncCacheReader:
    """``CacheReader`` for asyncio; the loader may be a coroutine function or a plain function."""

    def __init__(self, client: redis.asyncio.Redis | str, prefix: str, *, ttl_s: float = 3600) -> None:
        self._prefix = check_prefix(prefix)
        _ttl_ms(ttl_s)
        self.ttl_s = ttl_s
        self._client, self.url, self._owned = _async_client(client)
        self._read = self._client.register_script(READ_LUA)
        self._fill = self._client.register_script(FILL_LUA)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(settings.redis_url, settings.cache_prefix, ttl_s=settings.cache_ttl_s)

    async def get_or_fill(
        self,
        org: int,
        key: str,
        loader: Callable[[], Awaitable[bytes | str] | bytes | str],
        *,
        ttl_s: float | None = None,
    ) -> bytes:
        """As ``CacheReader.get_or_fill``."""
        entry = _Entry.of(self._prefix, org, key, self.ttl_s if ttl_s is None else ttl_s)
        with _unavailable(self.url):
            epoch, value = await self._read(keys=entry.slot_keys, args=[_fresh_epoch()])
            if value is not None:
                return _as_bytes(value)
            await self._client.sadd(entry.registry, entry.org)
        loaded = loader()
        value = _as_bytes(await loaded if inspect.isawaitable(loaded) else loaded)
        try:
            with _unavailable(self.url):
                await self._fill(keys=entry.slot_keys, args=[epoch, value, entry.ttl_ms])
        except Unavailable as exc:
            log.warning("cache fill skipped: %s", exc)
        return value

    async def aclose(self) -> None:
        if self._owned:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ---- indexer side -------------------------------------------------------------------------------


class CacheInvalidator:
    """Deletes organizations' caches after their changes are committed (the indexer's side).

    Every Redis failure that may pass is raised as ``Unavailable``; nothing is retried here.
    Constructed from a URL it owns its client (``aclose`` closes it).

    The key tracker (``track_direct_keys``, see ``cache_tracker``) starts at the first ``ping``,
    which waits for the start; ``invalidate`` and ``invalidate_all`` never run a start themselves:
    while tracking is not running they begin one in the background and raise ``Unavailable``.
    With ``on`` they raise ``ConfigError`` if the server does not allow tracking.
    """

    def __init__(
        self, client: redis.asyncio.Redis | str, prefix: str, *, track_direct_keys: TrackMode = "auto"
    ) -> None:
        self._prefix = check_prefix(prefix)
        self._client, self.url, self._owned = _async_client(client)
        self._invalidate = self._client.register_script(INVALIDATE_LUA)
        from .cache_tracker import KeyTracker  # here: cache_tracker imports this module

        self.tracker: KeyTracker = KeyTracker(self._client, self._prefix, self.url, track_direct_keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(settings.redis_url, settings.cache_prefix, track_direct_keys=settings.track_direct_keys)

    async def ping(self) -> None:
        """Redis answers and the key tracker runs (started here if it does not, and waited for)."""
        with _unavailable(self.url):
            await self._client.ping()
        await self.tracker.start()
        await self.tracker.barrier()

    async def invalidate(self, orgs: Iterable[int]) -> int:
        """Delete every cached key of each organization (each once); the number of keys deleted.

        All ids are validated before anything is deleted.  Idempotent, so a failed call is simply
        made again."""
        unique = sorted({check_org(org) for org in orgs})
        await self.tracker.barrier()
        return await self._delete(unique)

    async def _delete(self, unique: list[int]) -> int:
        deleted = 0
        for start in range(0, len(unique), _ORGS_PER_PIPELINE):
            chunk = unique[start : start + _ORGS_PER_PIPELINE]
            with _unavailable(self.url):
                # Not a transaction: each script is atomic on its own slot, orgs need not be.
                async with self._client.pipeline(transaction=False) as pipe:
                    for org in chunk:
                        await self._invalidate(
                            keys=[epoch_key(self._prefix, org), index_key(self._prefix, org)],
                            args=[namespace(self._prefix, org), _fresh_epoch()],
                            client=pipe,
                        )
                    deleted += sum(await pipe.execute())
        return deleted

    async def invalidate_all(self) -> int:
        """Invalidate every organization in the registry; the number of keys deleted.

        The registry is never shrunk: removing an org is racy against a reader that registered it
        and is about to fill (the fill would then be invisible to the next invalidate_all).  It
        holds one small integer per organization ever cached, and an invalidation of an org without
        keys costs O(1)."""
        await self.tracker.barrier()  # also registers the orgs of keys written directly
        orgs: set[int] = set()
        with _unavailable(self.url):
            async for member in self._client.sscan_iter(registry_key(self._prefix), count=1000):
                org = _registered_org(member)
                if org is not None:
                    orgs.add(org)
        return await self._delete(sorted(orgs))

    async def aclose(self) -> None:
        await self.tracker.aclose()
        if self._owned:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _registered_org(member: bytes | str) -> int | None:
    """A registry member as an org id; anything else (never written by us) is skipped."""
    text = member.decode(errors="replace") if isinstance(member, bytes) else member
    if text.isascii() and text.isdigit():
        try:
            return check_org(int(text))
        except ValueError:
            pass
    log.warning("ignoring a registry member that is not an organization id: %r", text[:80])
    return None
