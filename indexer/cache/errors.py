"""redis-py's errors by what the caller must do: the one translation for Redis.

``unavailable`` turns every failure that may pass by itself into ``Unavailable`` (retry with
backoff, acknowledge nothing); anything else propagates unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import redis.exceptions

from indexer.errors import Unavailable

# Failures worth retrying.  OOM and READONLY (failover in progress) pass once the server recovers.
_TRANSIENT = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError and AuthenticationError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    # A cluster client that reaches no node, or whose slot map has a hole (a failover under way).
    # Every command of ours names the keys of one slot, so nothing else raises these.
    redis.exceptions.RedisClusterException,
)

# Replies of a Redis Cluster node saying the slot map we routed by is out of date.
_TOPOLOGY_REPLIES = frozenset({"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "READONLY"})

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
    if isinstance(exc, _TRANSIENT):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and reply_code(exc) in TRANSIENT_REPLIES


def is_topology_change(exc: BaseException) -> bool:
    """Whether a failure on a cluster node says that the slot map changed (a failover, a resharding,
    a primary that became a replica) or that a node went away: read the map again."""
    if isinstance(exc, redis.exceptions.AskError | redis.exceptions.ClusterError | redis.exceptions.ReadOnlyError):
        return True
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True
    if isinstance(exc, redis.exceptions.RedisClusterException):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and reply_code(exc) in _TOPOLOGY_REPLIES


def as_unavailable(url: str, exc: BaseException) -> Unavailable:
    return Unavailable("redis", url, f"{type(exc).__name__}: {exc}")


@contextmanager
def unavailable(url: str) -> Iterator[None]:
    """Transient failures (``is_transient``) as ``Unavailable``; anything else propagates."""
    try:
        yield
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
        if is_transient(exc):
            raise as_unavailable(url, exc) from exc
        raise
