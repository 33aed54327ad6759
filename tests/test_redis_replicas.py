"""INDEXER_REDIS_MIN_REPLICAS: an invalidation counts as done only once that many replicas of the
primary have it (WAIT), so a promoted replica cannot serve what was deleted.  A primary and a
replica of the test's own, on free ports."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from indexer.cache import AsyncCacheReader, CacheInvalidator, data_key
from indexer.errors import Unavailable
from tests.support.process import free_port
from tests.support.waiting import eventually_sync

pytestmark = pytest.mark.slow


@contextmanager
def _redis(folder: Path, *args: str) -> Iterator[int]:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--repl-diskless-sync-delay", "0", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        eventually_sync(lambda: _pings(port), timeout_s=10, what=f"redis on {port}")
        yield port
    finally:
        server.kill()
        server.wait(10)


async def _fill(url: str, prefix: str) -> str:
    async with AsyncCacheReader(url, prefix) as reader:
        await reader.get_or_fill(9, "k", lambda: b"cached")
    return data_key(prefix, 9, "k")


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _linked(port: int) -> bool:
    info = redis.Redis(port=port).info("replication")
    return info.get("master_link_status") == "up"


async def test_the_invalidation_waits_for_the_replica_and_fails_without_it(tmp_path: Path, unique: str) -> None:
    with _redis(tmp_path / "primary") as primary:
        url = f"redis://127.0.0.1:{primary}/0"
        with _redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary)) as replica:
            eventually_sync(lambda: _linked(replica), timeout_s=15, what="the replica in sync")
            async with CacheInvalidator(url, unique, min_replicas=1, replica_timeout_ms=2000) as invalidator:
                await invalidator.start()
                key = await _fill(url, unique)
                assert await invalidator.invalidate([9]) == 1
                assert redis.Redis(port=replica).exists(key) == 0, "the replica has the delete already"
        # The replica is gone: the primary can no longer promise that a failover keeps the delete.
        async with CacheInvalidator(url, unique, min_replicas=1, replica_timeout_ms=200) as invalidator:
            await invalidator.start()
            await _fill(url, unique)
            with pytest.raises(Unavailable, match="reached 0 replica"):
                await invalidator.invalidate([9])
        async with CacheInvalidator(url, unique) as default:  # 0, the default: no waiting
            await default.start()
            await _fill(url, unique)
            assert await default.invalidate([9]) == 1
