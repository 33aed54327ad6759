"""Each entry filled through the helper records the epoch it was filled under, and the helper never
serves one filled under another epoch than the organization's current one: an entry back after
its invalidation (a failover to a stale replica, a RESTORE of an old dump) is stale."""

from __future__ import annotations

import redis

from indexer import cache
from indexer.cache import AsyncCacheReader, CacheInspector, CacheInvalidator, CacheReader
from indexer.config import Settings


async def test_a_fill_records_the_epoch_it_was_filled_under(
    reader: AsyncCacheReader, admin: redis.Redis, prefix: str
) -> None:
    assert await reader.get_or_fill(7, "k", lambda: b"\x00value with NULs\x00") == b"\x00value with NULs\x00"
    stored = admin.get(cache.data_key(prefix, 7, "k"))
    assert stored is not None
    # fill.lua writes the header keys.py reads: the two agree on the format.
    assert cache.recorded_epoch(stored) == (
        admin.get(cache.epoch_key(prefix, 7)),
        stored[: -len(b"\x00value with NULs\x00")],
    )
    assert cache.stored_value(stored) == b"\x00value with NULs\x00"


async def test_an_entry_restored_after_its_invalidation_is_never_served(
    settings: Settings, reader: AsyncCacheReader, invalidator: CacheInvalidator, admin: redis.Redis, prefix: str
) -> None:
    name, index = cache.data_key(prefix, 7, "k"), cache.index_key(prefix, 7)
    assert await reader.get_or_fill(7, "k", lambda: b"before the change") == b"before the change"
    dumped = admin.dump(name)
    assert dumped is not None
    assert await invalidator.invalidate([7]) == 1  # a change to organization 7 committed
    admin.restore(name, 0, dumped)  # ... and the old entry comes back; the epoch key stayed
    await invalidator.start()  # a barrier: the key tracker has indexed the restored key by now
    assert admin.sismember(index, name), "only its recorded epoch can tell this entry is stale"

    assert await reader.get_or_fill(7, "k", lambda: b"after the change") == b"after the change"
    assert await reader.get_or_fill(7, "k", lambda: b"not called") == b"after the change"  # filled again
    with CacheReader.from_settings(settings) as sync_reader:
        assert sync_reader.get_or_fill(7, "k", lambda: b"not called") == b"after the change"


async def test_an_entry_restored_with_its_index_is_never_served(
    settings: Settings, admin: redis.Redis, prefix: str
) -> None:
    # A replica that lagged has the old entry and the old index; the epoch key survived.
    name, index = cache.data_key(prefix, 8, "k"), cache.index_key(prefix, 8)
    off = settings.model_copy(update={"track_direct_keys": "off"})
    with CacheReader.from_settings(off) as sync_reader:
        assert sync_reader.get_or_fill(8, "k", lambda: b"old") == b"old"
        entry, members = admin.dump(name), admin.dump(index)
        assert entry is not None and members is not None
        async with CacheInvalidator.from_settings(off) as invalidator:
            assert await invalidator.invalidate([8]) == 1
        admin.restore(index, 0, members)
        admin.restore(name, 0, entry)
        async with CacheInspector.from_settings(off) as inspector:
            seen = await inspector.inspect(8, [name.encode()])
        assert [e.key for e in seen.stale] == [name.encode()] and seen.stale[0].indexed
        assert sync_reader.get_or_fill(8, "k", lambda: b"new") == b"new"
    async with CacheInspector.from_settings(off) as inspector:
        assert (await inspector.inspect(8, [name.encode()])).stale == []


async def test_drop_stale_deletes_only_entries_still_stale(
    settings: Settings, reader: AsyncCacheReader, admin: redis.Redis, prefix: str
) -> None:
    names = [cache.data_key(prefix, 9, key) for key in ("a", "b")]
    for key in ("a", "b"):
        await reader.get_or_fill(9, key, lambda: b"old")
    dumps = [admin.dump(name) for name in names]
    async with CacheInvalidator(settings.redis_url, prefix, track_direct_keys="off") as invalidator:
        await invalidator.invalidate([9])
    for name, dumped in zip(names, dumps, strict=True):
        admin.restore(name, 0, dumped)  # type: ignore[arg-type]
    async with CacheInspector.from_settings(settings) as inspector:
        seen = await inspector.inspect(9, [name.encode() for name in names])
        assert len(seen.stale) == 2
        assert await reader.get_or_fill(9, "b", lambda: b"fresh") == b"fresh"  # b is filled again meanwhile
        assert await inspector.drop_stale(9, seen.stale) == 1
    assert not admin.exists(names[0])
    assert cache.stored_value(admin.get(names[1]) or b"") == b"fresh"


async def test_keys_written_directly_stay_plain_and_are_unverifiable(
    settings: Settings, reader: AsyncCacheReader, invalidator: CacheInvalidator, admin: redis.Redis, prefix: str
) -> None:
    name = f"{prefix}:{{5}}:direct"
    admin.set(name, b"written by another service")
    await invalidator.start()  # indexed by the tracker
    assert await reader.get_or_fill(5, "direct", lambda: b"loaded") == b"written by another service"
    assert admin.get(name) == b"written by another service"
    admin.hset(f"{prefix}:{{5}}:a-hash", "f", "v")  # not a string: not the helper's either
    async with CacheInspector.from_settings(settings) as inspector:
        keys = sorted([key async for _, key in inspector.keys()])
        seen = await inspector.inspect(5, keys)
    assert [e.key for e in seen.unverifiable] == sorted([f"{prefix}:{{5}}:a-hash".encode(), name.encode()])
    assert seen.stale == []
