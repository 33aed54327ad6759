"""Faults, SIGTERM and the HTTP endpoints (/healthz, /readyz, /metrics), seen from outside the process."""

from __future__ import annotations

import json
import time

from tests.blackbox import pb
from tests.blackbox.harness import BlackBox
from tests.support.proxy import TcpProxy  # a plain TCP proxy of the test suite, not product code
from tests.support.waiting import eventually_sync

TS = "2020-01-01T00:00:00Z"


def test_health_ready_and_metrics_endpoints(bb: BlackBox) -> None:
    proc = bb.indexer()
    assert proc.http("/healthz")[0] == 200
    status, body = proc.http("/readyz")
    assert status == 200, body
    bb.publish(pb.mention_event("Inserted", 1, 1, TS))
    bb.wait_acked()
    status, text = proc.http("/metrics")
    assert status == 200 and "# TYPE" in text, text[:500]
    code, elapsed = proc.terminate()
    assert code == 0 and elapsed < 10, (code, elapsed)


def test_sigterm_under_load_exits_0_in_10s_and_kill_9_loses_nothing(bb: BlackBox) -> None:
    total = 3000
    proc = bb.indexer()
    proc.stop()  # the topology stands; now fill the queue while nobody consumes
    channel = bb.channel
    for i in range(1, total + 1):
        channel.basic_publish(bb.exchange, "events.MentionInserted",
                              pb.mention_event("Inserted", i, i % 50 + 1, TS, baggage={"pad": "p" * 200}))
    channel.basic_publish(bb.exchange, "events.MentionInserted", pb.mention_event("Inserted", total + 1, 1, TS))
    eventually_sync(lambda: (bb.queue_depth(bb.queue) or 0) >= total + 1, what="queue filled")

    proc.start()
    eventually_sync(lambda: len(bb.rows()) > 0, timeout_s=20, interval_s=0.01, what="first rows")
    proc.kill()  # kill -9 in the middle
    after_kill = len(bb.rows())
    assert after_kill < total, "the whole queue went through before the kill: make it longer"
    proc.start()
    eventually_sync(lambda: len(bb.rows()) > after_kill, timeout_s=20, interval_s=0.01, what="progress after restart")
    code, elapsed = proc.terminate(timeout_s=15)  # SIGTERM in the middle
    assert code == 0 and elapsed < 10, f"SIGTERM under load: exit {code} after {elapsed:.1f}s\n{proc.tail()}"
    proc.start()
    bb.wait_acked(timeout_s=40)
    rows = bb.rows()
    assert len(rows) == total + 1, f"{total + 1 - len(rows)} changes lost"
    assert bb.queue_depth(bb.dlq) == 0
    code, elapsed = proc.terminate()
    assert code == 0 and elapsed < 10, (code, elapsed)


def test_sigterm_during_start_up_exits_0(bb: BlackBox) -> None:
    proc = bb.indexer(start=False)
    proc.start(wait_ready=False)
    time.sleep(0.15)  # an orchestrator may stop a pod at any moment, also while it starts
    code, elapsed = proc.terminate(timeout_s=15)
    assert code == 0 and elapsed < 10, f"SIGTERM 0.15 s after start: exit {code} after {elapsed:.1f}s\n{proc.tail()}"


def test_redis_outage_holds_the_ack_until_the_invalidation_is_done(bb: BlackBox) -> None:
    with TcpProxy.for_url(bb.redis_url) as proxy:
        proc = bb.indexer(REDIS_URL=proxy.url(bb.redis_url), INDEXER_RETRY_MAX_S="0.5")
        key = bb.org_key(5)
        bb.redis.set(key, "v")
        bb.wait_acked()  # nothing in hand when Redis goes away
        proxy.cut()
        bb.publish(pb.mention_event("Inserted", 1, 5, TS))
        bb.wait_row(1)  # committed first ...
        proc.wait_http("/readyz", 503, timeout_s=15)
        time.sleep(1)  # the outage goes on while it retries: nothing may be acknowledged meanwhile
        ready, unacked = bb.queue_counts(bb.queue)
        assert ready + unacked >= 1, "acknowledged while Redis was unreachable"
        assert bb.redis.exists(key)
        proxy.restore()
        bb.wait_acked(timeout_s=30)
        assert not bb.redis.exists(key), "acked after the outage without invalidating"
        proc.wait_http("/readyz", 200, timeout_s=15)


def test_postgres_outage_holds_the_ack_and_resumes_without_restart(bb: BlackBox) -> None:
    with TcpProxy.for_url(bb.database_url) as proxy:
        proc = bb.indexer(DATABASE_URL=proxy.url(bb.database_url), INDEXER_RETRY_MAX_S="0.5")
        bb.wait_acked()
        proxy.cut()
        bb.publish(pb.mention_event("Inserted", 1, 5, TS))
        proc.wait_http("/readyz", 503, timeout_s=15)
        time.sleep(1)  # the outage goes on while it retries: nothing may be acknowledged meanwhile
        ready, unacked = bb.queue_counts(bb.queue)
        assert ready + unacked == 1, "acknowledged while Postgres was unreachable"
        assert bb.row(1) is None
        proxy.restore()
        bb.wait_row(1, timeout_s=30)
        bb.wait_acked(timeout_s=30)
        proc.wait_http("/readyz", 200, timeout_s=15)


def test_broker_connection_loss_registers_the_consumer_again(bb: BlackBox) -> None:
    with TcpProxy.for_url(bb.amqp_url) as proxy:
        proc = bb.indexer(AMQP_URL=proxy.url(bb.amqp_url), INDEXER_RETRY_MAX_S="0.5")
        bb.wait_acked()
        proxy.cut()
        proc.wait_http("/readyz", 503, timeout_s=15)
        bb.publish(pb.mention_event("Inserted", 1, 5, TS))  # straight to the broker
        time.sleep(0.5)  # the outage goes on: nothing can be consumed meanwhile
        assert bb.row(1) is None
        proxy.restore()
        bb.wait_row(1, timeout_s=30)
        bb.wait_acked(timeout_s=30)
        body = proc.wait_http("/readyz", 200, timeout_s=15)
        assert json.loads(body)


def test_two_indexers_started_together_converge(bb: BlackBox) -> None:
    import random

    first = bb.indexer(start=False)
    second = bb.indexer(start=False)
    first.start(wait_ready=False)
    second.start(wait_ready=False)
    first.wait_http("/readyz", 200)
    second.wait_http("/readyz", 200)
    rng = random.Random(3)
    events = []
    for mention_id in range(1, 41):
        for step in range(6):
            kind = rng.choice(["Inserted", "Updated", "Deleted"])
            events.append((kind, mention_id, rng.randrange(1, 4), f"2024-01-01T00:00:{rng.randrange(0, 5):02d}Z",
                           f"2023-0{rng.randrange(1, 9)}-01T00:00:00Z"))
    events += rng.sample(events, 60)  # duplicates
    rng.shuffle(events)
    channel = bb.channel
    for kind, mention_id, org, tx, md in events:
        channel.basic_publish(bb.exchange, f"events.Mention{kind}", pb.mention_event(kind, mention_id, org, tx, md))
    # the expected table: per mention, the highest version (timestamp, kind) wins; ties broken by the
    # product's documented rule, so only check rows whose winner is unique
    rank = {"Inserted": 0, "Updated": 1, "Deleted": 2}
    expected = {}
    for mention_id in range(1, 41):
        mine = [e for e in events if e[1] == mention_id]
        top = max((e[3], rank[e[0]]) for e in mine)
        winners = {(e[2], e[4]) for e in mine if (e[3], rank[e[0]]) == top}
        if len(winners) == 1:
            expected[mention_id] = (top[1] == 2, top[0])
    eventually_sync(lambda: len(bb.rows()) == 40, timeout_s=20, what="40 rows")
    for proc in (first, second):
        proc.wait_http("/readyz", 200)

    def final() -> dict[int, tuple[bool, str]]:
        rows = bb.rows()
        return {m: (rows[m][3], rows[m][2].strftime("%Y-%m-%dT%H:%M:%SZ")) for m in expected}

    try:
        eventually_sync(lambda: final() == expected, timeout_s=20, interval_s=0.1)
    except AssertionError:
        pass  # the assertion below says which mentions differ
    got = final()
    assert got == expected, {m: (got[m], expected[m]) for m in expected if got[m] != expected[m]}


def test_http_port_0_turns_the_endpoint_off(bb: BlackBox) -> None:
    import os

    proc = bb.indexer(start=False, INDEXER_HTTP_PORT="0")
    proc.start(wait_ready=False)
    eventually_sync(lambda: bb.queue_depth(bb.queue) is not None, what="the queue declared")
    bb.publish(pb.mention_event("Inserted", 1, 1, TS))
    bb.wait_row(1)
    inodes = set()
    for fd in os.listdir(f"/proc/{proc.process.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{proc.process.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                    listening.append(parts[1])
    assert not listening, f"INDEXER_HTTP_PORT=0 but the process listens on {listening}"


def test_sigterm_while_postgres_hangs_exits_0_in_10s_and_loses_nothing(bb: BlackBox) -> None:
    with TcpProxy.for_url(bb.database_url) as proxy:
        proc = bb.indexer(DATABASE_URL=proxy.url(bb.database_url))
        bb.wait_acked()
        proxy.freeze()  # answers nothing, closes nothing
        bb.publish(pb.mention_event("Inserted", 1, 5, TS))
        time.sleep(1)  # its batch waits on the hung Postgres when SIGTERM comes
        code, elapsed = proc.terminate(timeout_s=15)
        assert code == 0 and elapsed < 10, f"SIGTERM with a hung Postgres: exit {code} after {elapsed:.1f}s\n{proc.tail()}"
        proxy.restore()
    proc = bb.indexer()
    bb.wait_row(1)
    bb.wait_acked()
