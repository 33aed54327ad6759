"""Per-organization caches under ``<prefix>:{<org>}:``, written here with plain SETs."""

from __future__ import annotations

from tests.blackbox import pb
from tests.blackbox.harness import BlackBox

TS = "Mon, 02 Jan 2006 15:04:05 UTC"


def _outside(bb: BlackBox, org: int) -> list[str]:
    """Keys a correct invalidation of ``org`` (or of everything) never touches."""
    u = bb.unique
    return [
        f"{u}-other:{{{org}}}:k",          # another prefix
        f"{bb.prefix}2:{{{org}}}:k",        # a prefix that merely starts with ours (a glob trap)
        f"{u}-mentions-x:{{{org}}}:k",
        f"{u}:{{{org}}}:k",
    ]


def test_plain_set_keys_are_gone_once_the_change_is_acked(bb: BlackBox) -> None:
    before_start = bb.org_key(55, "set-before-the-indexer-started")
    bb.redis.set(before_start, "v")
    bb.indexer()
    neighbours = [bb.org_key(43), bb.org_key(420), bb.org_key(4), bb.org_key(142)] + _outside(bb, 42)
    for k in neighbours:
        bb.redis.set(k, "v")
    for i in range(3):  # a key SET just before the event is published, three times
        k = bb.org_key(42, f"entry-{i}")
        bb.redis.set(k, "v")
        bb.publish(pb.mention_event("Inserted", 100 + i, 42, TS))
        bb.wait_acked()
        assert not bb.redis.exists(k), f"{k} existed before the change committed and survived its ack"
    many = [bb.org_key(42, f"bulk-{i}") for i in range(2000)]
    with bb.redis.pipeline(transaction=False) as pipe:
        for k in many:
            pipe.set(k, "v")
        pipe.execute()
    bb.publish(pb.mention_event("Updated", 100, 42, "Mon, 02 Jan 2006 15:04:06 UTC"))
    bb.wait_acked()
    left = bb.existing(many)
    assert not left, f"{len(left)} of 2000 keys of organization 42 survived the ack"
    bb.publish(pb.mention_event("Inserted", 200, 55, TS))
    bb.wait_acked()
    assert not bb.redis.exists(before_start), "a key that existed before the indexer started survived"
    assert bb.existing(neighbours) == set(neighbours), "keys outside organization 42's namespace were deleted"


def test_a_move_invalidates_both_organizations(bb: BlackBox) -> None:
    bb.indexer()
    bb.publish(pb.mention_event("Inserted", 1, 1, "2020-01-01T00:00:00Z"))
    bb.wait_acked()
    a, b, c = bb.org_key(1), bb.org_key(2), bb.org_key(3)
    for k in (a, b, c):
        bb.redis.set(k, "v")
    bb.publish(pb.mention_event("Updated", 1, 2, "2020-01-01T00:00:01Z"))
    bb.wait_acked()
    assert bb.row(1)[0] == 2
    assert bb.existing([a, b, c]) == {c}, "a move from organization 1 to 2 must invalidate both (and only them)"


def test_a_duplicate_redelivery_still_invalidates(bb: BlackBox) -> None:
    bb.indexer()
    body = pb.mention_event("Inserted", 1, 9, TS)
    bb.publish(body)
    bb.wait_acked()
    k = bb.org_key(9)
    bb.redis.set(k, "v")
    bb.publish(body)
    bb.wait_acked()
    assert not bb.redis.exists(k), "the duplicate of an applied change did not invalidate its organization"


def test_trigger_cache_refresh_for_one_organization_and_for_all(bb: BlackBox) -> None:
    before_start = bb.org_key(6001, "written-while-the-indexer-was-down")
    bb.redis.set(before_start, "v")
    bb.indexer()
    outside = _outside(bb, 42) + _outside(bb, 43) + [f"{bb.prefix}-not-an-org"]
    for k in outside:
        bb.redis.set(k, "v")
    k42, k43, k420 = bb.org_key(42), bb.org_key(43), bb.org_key(420)
    for k in (k42, k43, k420):
        bb.redis.set(k, "v")
    bb.publish(pb.refresh_event("42"), "events.TriggerCacheRefresh")
    bb.wait_acked()
    assert bb.existing([k42, k43, k420]) == {k43, k420}
    # empty organization: every organization under the prefix, also ones no event ever named
    keys = [bb.org_key(org, f"x{org}") for org in (1, 2, 43, 9_223_372_036_854_775_807)] + [before_start]
    for k in keys:
        bb.redis.set(k, "v")
    bb.publish(pb.refresh_event(""), "events.TriggerCacheRefresh")
    bb.wait_acked()
    assert not bb.existing(keys + [k43, k420]), bb.existing(keys + [k43, k420])
    assert bb.existing(outside) == set(outside), "keys outside the prefix were touched"
    assert bb.queue_depth(bb.dlq) == 0


def test_refresh_cache_command(bb: BlackBox) -> None:
    bb.indexer()
    k42, k43 = bb.org_key(42), bb.org_key(43)
    outside = _outside(bb, 42)
    for k in (k42, k43, *outside):
        bb.redis.set(k, "v")
    result = bb.cli("refresh-cache", "--org", "42")
    assert result.code == 0, result
    bb.wait_acked()
    assert bb.existing([k42, k43]) == {k43}
    result = bb.cli("refresh-cache")
    assert result.code == 0, result
    bb.wait_acked()
    assert bb.existing([k42, k43]) == set()
    assert bb.existing(outside) == set(outside)
    for bad in ("*", "1*", "abc", "-1", ""):
        result = bb.cli("refresh-cache", "--org", bad)
        assert result.code == 2, (bad, result)
        assert "org" in result.err.lower(), (bad, result)


def test_keys_written_with_any_command_are_invalidated(bb: BlackBox) -> None:
    bb.indexer()
    r = bb.redis
    k = lambda name: bb.org_key(42, name)  # noqa: E731
    r.hset(k("hash"), mapping={"a": "1"})
    r.sadd(k("set"), "a")
    r.lpush(k("list"), "a")
    r.zadd(k("zset"), {"a": 1.0})
    r.mset({k("mset-1"): "a", k("mset-2"): "b"})
    r.set(k("setex"), "a", ex=600)
    r.set(f"{bb.unique}-tmp", "a")
    r.rename(f"{bb.unique}-tmp", k("renamed"))
    r.set(f"{bb.unique}-src", "a")
    r.copy(f"{bb.unique}-src", k("copied"))
    r.eval("redis.call('SET', KEYS[1], 'a')", 1, k("lua"))
    with r.pipeline(transaction=True) as pipe:
        pipe.set(k("multi"), "a").incr(k("counter"))
        pipe.execute()
    keys = [k(n) for n in ("hash", "set", "list", "zset", "mset-1", "mset-2", "setex", "renamed", "copied", "lua",
                           "multi", "counter")]
    assert bb.existing(keys) == set(keys)
    bb.publish(pb.mention_event("Inserted", 1, 42, TS))
    bb.wait_acked()
    assert not bb.existing(keys), f"survived the ack: {sorted(bb.existing(keys))}"
    assert r.exists(f"{bb.unique}-src")


def test_invalidation_never_walks_the_keyspace_per_event(bb: BlackBox) -> None:
    import threading

    db = 13  # a database of its own, so MONITOR lines can be told apart
    url = bb.redis_url.rsplit("/", 1)[0] + f"/{db}"
    import redis as redis_module

    r = redis_module.Redis.from_url(url)
    proc = bb.indexer(REDIS_URL=url)
    for org in range(1, 30):
        r.set(bb.org_key(org), "v")
    bb.publish(pb.mention_event("Inserted", 1, 1, TS))
    bb.wait_acked()  # start-up (its one adoption SCAN) is over
    seen: list[str] = []
    stop = f"{bb.unique}-stop"

    def watch() -> None:
        with redis_module.Redis.from_url(url).monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                text = command.get("command", "")
                if stop in text:
                    return
                if command.get("db") == db:
                    seen.append(text)

    ready = threading.Event()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        for org in range(2, 12):
            r.set(bb.org_key(org, "again"), "v")
            bb.publish(pb.mention_event("Inserted", 100 + org, org, TS))
        bb.publish(pb.refresh_event("3"), "events.TriggerCacheRefresh")
        bb.publish(pb.refresh_event(""), "events.TriggerCacheRefresh")
        bb.wait_acked()
    finally:
        r.echo(stop)
        thread.join(10)
    walks = [c for c in seen if c.split(" ", 1)[0].upper() in ("SCAN", "KEYS")]
    assert any(c.split(" ", 1)[0].upper() in ("EVALSHA", "EVAL", "DEL", "UNLINK", "FCALL") for c in seen), seen[:20]
    assert not walks, f"keyspace walks while handling events: {walks[:5]}"
    left = [k for k in r.scan_iter(match=f"{bb.prefix}:{{*", count=1000)]
    assert not [k for k in left if b"}:" in k], left
    for key in r.scan_iter(match=f"{bb.unique}*", count=1000):
        r.delete(key)
    r.close()
    proc.stop()


def test_a_missing_dead_letter_queue_is_not_a_lost_message(bb: BlackBox) -> None:
    bb.indexer()
    bb.channel.queue_delete(bb.dlq)  # an operator removed it
    bb.publish(b"\x0a\xff", content_type=None, message_id="garbage")
    bb.publish(pb.mention_event("Inserted", 1, 5, TS))
    bb.wait_acked()
    letters = bb.take_letters(1)
    assert [letter.properties.message_id for letter in letters] == ["garbage"]
    assert bb.row(1) is not None


def test_a_prefix_with_colons(bb: BlackBox) -> None:
    bb.prefix = f"{bb.unique}:svc:mentions"
    bb.indexer()
    mine, theirs = bb.org_key(42), f"{bb.unique}:svc:mentions2:{{42}}:k"
    other_org = bb.org_key(7)
    for k in (mine, theirs, other_org):
        bb.redis.set(k, "v")
    bb.publish(pb.mention_event("Inserted", 1, 42, TS))
    bb.wait_acked()
    assert bb.existing([mine, theirs, other_org]) == {theirs, other_org}
    bb.publish(pb.refresh_event(""), "events.TriggerCacheRefresh")
    bb.wait_acked()
    assert bb.existing([mine, theirs, other_org]) == {theirs}


def test_a_delete_without_organization_invalidates_the_stored_one(bb: BlackBox) -> None:
    bb.indexer()
    bb.publish(pb.mention_event("Inserted", 1, 42, "2020-01-01T00:00:00Z"))
    bb.wait_acked()
    k42 = bb.org_key(42)
    bb.redis.set(k42, "v")
    bb.publish(pb.mention_event("Deleted", 1, None, "2020-01-01T00:00:01Z"), "events.MentionDeleted")
    bb.wait_acked()
    row = bb.row(1)
    assert row is not None and row[3] is True, row
    if row[0] == 42:  # the mention of organization 42 changed: its caches must go
        assert not bb.redis.exists(k42), "a Delete naming no organization left organization 42's cache in place"
