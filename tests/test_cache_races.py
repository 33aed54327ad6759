"""The stale-set race: a fill that loaded before a commit must not outlive that commit's invalidation.

The indexer's order is modelled exactly: the "database" (a Python variable) is committed first,
then the organization is invalidated, and only then is the change acknowledged.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import redis

from indexer import cache
from indexer.cache import AsyncCacheReader, CacheInvalidator, CacheReader
from indexer.config import Settings


async def test_fill_after_an_invalidation_is_refused(
    reader: AsyncCacheReader, invalidator: CacheInvalidator, admin: redis.Redis, prefix: str
) -> None:
    database = {"version": 1}

    async def slow_loader() -> str:
        loaded = database["version"]
        database["version"] = 2  # a writer commits while we are loading ...
        await invalidator.invalidate([1])  # ... and invalidates before we store
        return str(loaded)

    assert await reader.get_or_fill(1, "k", slow_loader) == b"1"  # the caller still gets its value
    assert admin.exists(cache.data_key(prefix, 1, "k")) == 0

    calls = []

    def loader() -> str:
        calls.append(1)
        return str(database["version"])

    assert await reader.get_or_fill(1, "k", loader) == b"2"
    assert await reader.get_or_fill(1, "k", loader) == b"2"
    assert len(calls) == 1


def test_sync_fill_after_an_invalidation_is_refused(settings: Settings, admin: redis.Redis) -> None:
    database = {"version": 1}

    def slow_loader() -> str:
        loaded = database["version"]
        database["version"] = 2

        async def invalidate() -> None:
            async with CacheInvalidator.from_settings(settings) as inv:
                await inv.start()
                await inv.invalidate([1])

        asyncio.run(invalidate())
        return str(loaded)

    with CacheReader.from_settings(settings) as r:
        assert r.get_or_fill(1, "k", slow_loader) == b"1"
        assert admin.exists(cache.data_key(settings.cache_prefix, 1, "k")) == 0
        assert r.get_or_fill(1, "k", lambda: str(database["version"])) == b"2"
        assert r.get_or_fill(1, "k", lambda: "never called") == b"2"


async def test_fill_is_refused_when_the_epoch_was_evicted(
    reader: AsyncCacheReader, admin: redis.Redis, prefix: str
) -> None:
    def loader() -> bytes:
        admin.delete(cache.epoch_key(prefix, 1))  # as maxmemory eviction would
        return b"v"

    assert await reader.get_or_fill(1, "k", loader) == b"v"
    assert admin.exists(cache.data_key(prefix, 1, "k")) == 0
    assert await reader.get_or_fill(1, "k", lambda: b"w") == b"w"
    assert cache.stored_value(admin.get(cache.data_key(prefix, 1, "k"))) == b"w"


class Database:
    """The read model of one organization: a version, committed before its invalidation."""

    def __init__(self) -> None:
        self.version = 0  # committed
        self.acknowledged = 0  # committed and invalidated: readers may never see less
        self.stale_loads = 0  # loads overtaken by a commit: proves the race was exercised
        self.violations: list[str] = []
        self.lock = threading.Lock()

    def check(self, floor: int, value: bytes, who: str) -> None:
        if int(value) < floor:
            with self.lock:
                self.violations.append(f"{who} read version {int(value)} after {floor} was acknowledged")


async def test_concurrent_fillers_never_serve_data_older_than_an_acknowledged_commit(
    settings: Settings, reader: AsyncCacheReader, invalidator: CacheInvalidator
) -> None:
    db = Database()
    writes = 150
    done = asyncio.Event()
    stop = threading.Event()

    async def writer() -> None:
        for version in range(1, writes + 1):
            db.version = version  # commit
            await invalidator.invalidate([1])  # invalidate
            db.acknowledged = version  # ack
            await asyncio.sleep(random.uniform(0, 0.002))
        done.set()

    async def async_filler(n: int) -> None:
        async def load() -> str:
            loaded = db.version
            await asyncio.sleep(random.uniform(0, 0.003))  # a slow query
            if db.version != loaded:
                db.stale_loads += 1
            return str(loaded)

        while not done.is_set():
            floor = db.acknowledged
            db.check(floor, await reader.get_or_fill(1, "state", load), f"async filler {n}")

    def sync_filler(n: int) -> None:
        def load() -> str:
            loaded = db.version
            time.sleep(random.uniform(0, 0.003))
            return str(loaded)

        with CacheReader.from_settings(settings) as r:
            while not stop.is_set():
                floor = db.acknowledged
                db.check(floor, r.get_or_fill(1, "state", load), f"sync filler {n}")

    threads = [threading.Thread(target=sync_filler, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    try:
        await asyncio.wait_for(asyncio.gather(writer(), *(async_filler(n) for n in range(8))), timeout=60)
    finally:
        stop.set()
        for thread in threads:
            await asyncio.to_thread(thread.join, 10)

    assert db.violations == []
    assert db.stale_loads > 0, "no load was overtaken by a commit: the race was not exercised"
    # Whatever is cached now (if anything) was loaded after the last commit.
    assert await reader.get_or_fill(1, "state", lambda: str(db.version)) == str(writes).encode()
