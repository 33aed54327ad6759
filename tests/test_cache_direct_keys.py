"""Keys written into an organization's namespace without the cache helper are invalidated too.

Another service (or a black-box test) may write ``P:{42}:whatever`` with a plain SET; the
invalidator's key tracker (indexer/cache/tracker.py) indexes such keys from keyspace
notifications, and each invalidation first waits until every key created before it is indexed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from indexer import cache
from indexer.cache import AsyncCacheReader, CacheInvalidator
from indexer.cache import tracker as cache_tracker
from indexer.config import Settings, load_settings
from indexer.errors import ConfigError, Unavailable
from tests.support.cache_fixtures import assert_untouched, planted, retrying, tracker_connection
from tests.support.waiting import eventually


@pytest.fixture
def outsiders(admin: redis.Redis, prefix: str) -> Iterator[list[str]]:
    """Keys near org 42's namespace but outside it."""
    names = [
        f"{prefix}:{{43}}:foo",  # another organization
        f"{prefix}:{{042}}:foo",  # not the decimal id 42
        f"{prefix}:{{42}}foo",  # no colon after the hash tag
        f"{prefix}:{{42",
        f"{prefix}-other:{{42}}:foo",  # another prefix that starts like ours
        f"{prefix}x:{{42}}:foo",
    ]
    with planted(admin, names):
        yield names


# ---- the barrier --------------------------------------------------------------------------------


async def test_key_set_right_before_invalidate_is_deleted(
    invalidator: CacheInvalidator, admin: redis.Redis, prefix: str, outsiders: list[str]
) -> None:
    await invalidator.start()
    assert invalidator.tracker.active is True
    names = [f"{prefix}:{{42}}:foo", f"{prefix}:{{42}}:a:b {{c}}", f"{prefix}:{{42}}:"]
    for round_ in range(200):
        name = names[round_ % len(names)]
        if round_ % 2:
            admin.set(name, b"direct", ex=600)
        else:
            admin.set(name, b"direct")
        # No sleep: the barrier makes it deterministic.
        assert await invalidator.invalidate([42]) == 1
        assert admin.exists(name) == 0, f"round {round_}: {name} survived"
    assert_untouched(admin, outsiders)


async def test_a_key_indexed_only_after_the_deletes_is_deleted_after_the_barrier(
    invalidator: CacheInvalidator, admin: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deletes run beside the barrier: a direct key whose event is read late, once they have
    run, makes its organization be invalidated again when the barrier is through."""
    tracker = invalidator.tracker
    assert isinstance(tracker, cache_tracker.KeyTracker) and tracker.active is True
    release = asyncio.Event()
    subscription = tracker._sub
    assert subscription is not None
    real_track = subscription._track

    async def late_track(keys: list[cache_tracker.Tracked]) -> None:
        await release.wait()  # the tracker is slow to index what it was told
        await real_track(keys)

    monkeypatch.setattr(subscription, "_track", late_track)
    epoch = cache.epoch_key(prefix, 42)
    before = admin.get(epoch)
    name = f"{prefix}:{{42}}:late"
    admin.set(name, b"direct")
    invalidating = asyncio.create_task(invalidator.invalidate([42]))
    # The first delete ran (the epoch moved) while the key was not indexed yet.
    await eventually(lambda: _changed(admin, epoch, before), timeout_s=5, interval_s=0.005, what="the first delete")
    assert admin.exists(name) == 1 and not invalidating.done()
    release.set()
    assert await asyncio.wait_for(invalidating, 5) == 1
    assert admin.exists(name) == 0


async def _changed(admin: redis.Redis, key: str, before: bytes | None) -> bool:
    return admin.get(key) != before


async def test_many_direct_keys_and_concurrent_invalidations(
    invalidator: CacheInvalidator, admin: redis.Redis, prefix: str, outsiders: list[str]
) -> None:
    await invalidator.start()
    orgs = range(100, 120)
    for round_ in range(5):
        pipe = admin.pipeline(transaction=False)
        for org in orgs:
            for n in range(150):
                pipe.set(f"{prefix}:{{{org}}}:k{n}", b"direct")
        pipe.execute()
        counts = await asyncio.gather(*(invalidator.invalidate([org]) for org in orgs))
        assert counts == [150] * len(orgs), f"round {round_}"
    assert admin.exists(*(f"{prefix}:{{{org}}}:k{n}" for org in orgs for n in range(150))) == 0
    assert_untouched(admin, outsiders)


async def test_key_written_before_the_invalidator_started_is_adopted(
    settings: Settings, admin: redis.Redis, prefix: str, outsiders: list[str]
) -> None:
    admin.set(f"{prefix}:{{42}}:old", b"direct")  # e.g. while the indexer was down
    admin.set(f"{prefix}:{{42}}:older", b"direct", ex=600)
    async with CacheInvalidator.from_settings(settings) as inv:
        assert inv.tracker.active is None  # lazy: nothing happens before the first call
        admin.set(f"{prefix}:{{42}}:lazy", b"direct")
        # An invalidation never runs the start (and its SCAN) itself: it begins it in the
        # background and is unavailable until it is done.
        with pytest.raises(Unavailable, match="cache key tracking is starting"):
            await inv.invalidate([42])
        assert (await retrying(lambda: inv.invalidate([42])))[0] == 3
        assert inv.tracker.active is True
    assert admin.exists(f"{prefix}:{{42}}:old", f"{prefix}:{{42}}:older", f"{prefix}:{{42}}:lazy") == 0
    assert_untouched(admin, outsiders)


async def test_invalidate_all_deletes_direct_keys_of_every_org(
    invalidator: CacheInvalidator, admin: redis.Redis, prefix: str, outsiders: list[str]
) -> None:
    admin.set(f"{prefix}:{{7}}:before", b"direct")
    await invalidator.start()
    admin.set(f"{prefix}:{{8}}:after", b"direct")
    admin.set(f"{prefix}:{{9223372036854775807}}:max", b"direct")
    # Org 43 has a key too (the outsiders fixture), so it is flushed with the rest.
    assert await invalidator.invalidate_all() == 4
    assert admin.exists(f"{prefix}:{{7}}:before", f"{prefix}:{{8}}:after") == 0
    assert_untouched(admin, [name for name in outsiders if "{43}" not in name])
    assert admin.sismember(cache.registry_key(prefix), b"8")


async def test_direct_key_gets_the_fill_helpers_bookkeeping(
    invalidator: CacheInvalidator, settings: Settings, admin: redis.Redis, prefix: str
) -> None:
    await invalidator.start()
    admin.set(f"{prefix}:{{1}}:short", b"direct", ex=100)
    await invalidator.start()  # a barrier: indexed by now
    index = cache.index_key(prefix, 1)
    assert admin.sismember(index, f"{prefix}:{{1}}:short")
    assert 90_000 < admin.pttl(index) <= 100_000  # outlives its member
    admin.set(f"{prefix}:{{1}}:forever", b"direct")
    await invalidator.start()
    assert admin.pttl(index) == -1

    # Indexed keys are served by the readers, like filled ones.
    async with AsyncCacheReader.from_settings(settings) as reader:
        assert await reader.get_or_fill(1, "forever", lambda: b"loaded") == b"direct"
    assert await invalidator.invalidate([1]) == 2


async def test_an_invalidation_never_scans(
    invalidator: CacheInvalidator, admin: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await invalidator.start()  # the one SCAN, at start

    def no_scan(*args: object, **kwargs: object) -> None:
        raise AssertionError("SCAN during an invalidation")

    monkeypatch.setattr(redis.asyncio.Redis, "scan", no_scan)
    monkeypatch.setattr(redis.asyncio.Redis, "scan_iter", no_scan)
    admin.set(f"{prefix}:{{42}}:foo", b"direct")
    assert await invalidator.invalidate([42]) == 1


# ---- modes --------------------------------------------------------------------------------------


async def test_off_leaves_direct_keys_alone(settings: Settings, admin: redis.Redis, prefix: str) -> None:
    # The fallback (also what ``auto`` does where Redis does not allow tracking): only keys written
    # through the helper are invalidated; a direct key survives, and the readers never serve it.
    off = settings.model_copy(update={"track_direct_keys": "off"})
    async with CacheInvalidator.from_settings(off) as inv, AsyncCacheReader.from_settings(off) as reader:
        await reader.get_or_fill(42, "filled", lambda: b"v")
        admin.set(f"{prefix}:{{42}}:direct", b"direct")
        assert await inv.invalidate([42]) == 1
        assert inv.tracker.active is False
        assert await reader.get_or_fill(42, "direct", lambda: b"loaded") == b"loaded"
    assert admin.exists(f"{prefix}:{{42}}:filled") == 0
    assert [c for c in admin.client_list() if c.get("name") == inv.tracker.client_name] == []


def test_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INDEXER_TRACK_DIRECT_KEYS", raising=False)
    assert load_settings().track_direct_keys == "auto"
    monkeypatch.setenv("INDEXER_TRACK_DIRECT_KEYS", "off")
    assert load_settings().track_direct_keys == "off"
    monkeypatch.setenv("INDEXER_TRACK_DIRECT_KEYS", "sometimes")
    with pytest.raises(ConfigError, match="INDEXER_TRACK_DIRECT_KEYS"):
        load_settings()


async def test_unreachable_redis_is_unavailable_in_every_mode() -> None:
    for mode in ("auto", "on"):
        async with CacheInvalidator("redis://127.0.0.1:1/0", "p", track_direct_keys=mode) as inv:  # type: ignore[arg-type]
            with pytest.raises(Unavailable):
                await inv.invalidate([1])


class StubServer:
    """Just enough of a Redis client for the tracker's notification setup."""

    def __init__(self, version: str, flags: str | None) -> None:
        self.version = version
        self.flags = flags
        self.sets: list[str] = []

    async def info(self, section: str) -> dict[str, str]:
        return {"redis_version": self.version}

    async def config_get(self, name: str) -> dict[bytes, bytes]:
        return {} if self.flags is None else {name.encode(): self.flags.encode()}

    async def config_set(self, name: str, value: str) -> bool:
        self.flags = "".join(sorted(set(value)))  # Redis normalizes too
        self.sets.append(value)
        return True


@pytest.mark.parametrize(
    ("flags", "expected_set"),
    [("", ["Kn"]), ("AE", ["AEKn"]), ("Kx", ["Kxn"]), ("Egn", ["EgnK"]), ("AKn", []), ("KEn$", [])],
)
async def test_notification_flags_are_only_ever_added(flags: str, expected_set: list[str]) -> None:
    server = StubServer("7.0.15", flags)
    tracker = cache_tracker.KeyTracker(redis.asyncio.Redis(), "p", "redis://stub", "on")
    tracker._client = server  # type: ignore[assignment]
    await tracker._enable_notifications()
    assert server.sets == expected_set
    assert set(flags) <= set(server.flags or "") and {"K", "n"} <= set(server.flags or "")


@pytest.mark.parametrize(("version", "flags"), [("6.2.14", ""), ("7.0.15", None)])
async def test_servers_without_new_key_events_are_refused(version: str, flags: str | None) -> None:
    tracker = cache_tracker.KeyTracker(redis.asyncio.Redis(), "p", "redis://stub", "on")
    tracker._client = StubServer(version, flags)  # type: ignore[assignment]
    with pytest.raises(cache_tracker._Unsupported):
        await tracker._enable_notifications()


# ---- failures -----------------------------------------------------------------------------------


async def test_killed_subscription_is_restored_and_catches_up(
    invalidator: CacheInvalidator, admin: redis.Redis, prefix: str, outsiders: list[str]
) -> None:
    await invalidator.start()
    for round_ in range(10):
        killed = tracker_connection(admin, invalidator)
        assert admin.client_kill_filter(_id=killed["id"]) == 1
        name = f"{prefix}:{{42}}:written-while-down-{round_}"
        admin.set(name, b"direct")  # its notification is lost with the connection
        # Unavailable (the caller's retry loop holds the ack) until the restart, in the background, is done.
        assert (await retrying(lambda: invalidator.invalidate([42]), within_s=2))[0] == 1
        assert admin.exists(name) == 0, f"round {round_}"
        assert tracker_connection(admin, invalidator)["id"] != killed["id"]  # subscribed again
    assert_untouched(admin, outsiders)


async def test_lost_notification_flags_restart_the_tracker(
    invalidator: CacheInvalidator, admin: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await invalidator.start()
    first = tracker_connection(admin, invalidator)["id"]
    tracker = invalidator.tracker
    real_flags = tracker._flags
    answers = ["E"]  # someone switched them off once; the restart's own check sees the real ones

    async def flags() -> str:
        return answers.pop() if answers else await real_flags()

    monkeypatch.setattr(tracker, "_flags", flags)
    admin.set(f"{prefix}:{{42}}:foo", b"direct")
    assert (await retrying(lambda: invalidator.invalidate([42])))[0] == 1
    assert tracker_connection(admin, invalidator)["id"] != first


async def test_failed_start_is_retried(
    settings: Settings, admin: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    invalidator = CacheInvalidator.from_settings(settings)
    tracker = invalidator.tracker
    real_adopt = tracker._adopt_existing

    async def broken() -> None:
        raise redis.exceptions.ConnectionError("connection reset by peer")

    monkeypatch.setattr(tracker, "_adopt_existing", broken)
    with pytest.raises(Unavailable, match="connection reset by peer"):
        await invalidator.start()
    # An invalidation begins the next attempt and is unavailable, telling why the last one failed.
    with pytest.raises(Unavailable, match="cache key tracking is starting"):
        await invalidator.invalidate([42])
    assert tracker.active is None

    async def closed() -> bool:  # the subscription opened for that start
        return not [c for c in admin.client_list() if c.get("name") == tracker.client_name]

    await eventually(closed, timeout_s=1, interval_s=0.01, what="the subscription of the failed start closed")

    monkeypatch.setattr(tracker, "_adopt_existing", real_adopt)
    admin.set(f"{prefix}:{{42}}:foo", b"direct")
    try:
        assert (await retrying(lambda: invalidator.invalidate([42])))[0] == 1
    finally:
        await invalidator.aclose()


async def test_auto_falls_back_once_with_a_warning(
    settings: Settings, admin: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def no_config(*args: object) -> None:
        raise redis.exceptions.ResponseError("unknown command 'CONFIG'")  # e.g. a managed Redis

    async with CacheInvalidator.from_settings(settings) as inv:
        monkeypatch.setattr(inv.tracker, "_flags", no_config)
        with caplog.at_level(logging.WARNING, logger="indexer.cache.tracker"):
            admin.set(f"{prefix}:{{42}}:direct", b"direct")
            await inv.start()
            assert await inv.invalidate([42]) == 0
            assert await inv.invalidate([42]) == 0
        assert inv.tracker.active is False
    assert caplog.text.count("cannot track keys written directly") == 1
    assert admin.exists(f"{prefix}:{{42}}:direct") == 1

    on = settings.model_copy(update={"track_direct_keys": "on"})
    async with CacheInvalidator.from_settings(on) as inv:
        monkeypatch.setattr(inv.tracker, "_flags", no_config)
        with pytest.raises(ConfigError, match="INDEXER_TRACK_DIRECT_KEYS=on"):
            await inv.start()
