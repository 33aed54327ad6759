"""Fault rounds on the clusters, in the manner of Kafka Connect's bounce test: three indexers on one
quorum queue of the 3-node RabbitMQ cluster, the Redis Cluster as cache (``INDEXER_REDIS_MIN_REPLICAS
=1``), Postgres through a ``TcpProxy``; 20,000+ events of a random history (moves, deletes,
duplicates) published with confirms while faults come one after the other:

1. kill -9 of an indexer (restarted after a while);
2. kill -9 of the broker node holding the queue's leader, which an indexer is connected to
   (``rabbitmqctl list_connections``); restarted once the indexers have moved on;
3. kill -9 of a Redis primary: its replica takes over; the old one is restarted so that WAIT can be
   satisfied again;
4. Postgres cut for a few seconds.

Afterwards: the queue drained, the read model equal to the in-order oracle (0 changes lost, 0 rows
different), and ``mention-indexer audit --json`` against the oracle as source: read model
missing/extra/changed 0, cache stale 0.  The seconds each recovery took are printed (from the
fault, or from the restart, to the next batch each indexer acknowledged).  ``FAULT_SEED`` replays
a history; ``FAULT_ROUNDS`` sets how many times the four faults come (default 2).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.crc import key_slot

from indexer.cache import AsyncCacheReader, data_key, epoch_key
from indexer.changes import Change, Kind, version_key
from indexer.config import Settings
from tests.support.amqp import queue_state
from tests.support.clusters import RabbitCluster, RedisCluster
from tests.support.commands import cli_env
from tests.support.fault_rounds import (
    CacheFiller,
    ClusterPublisher,
    Watcher,
    consumer_nodes,
    create_source,
    drop_schema,
)
from tests.support.indexer_process import IndexerProcess
from tests.support.process import arun_cli
from tests.support.proxy import TcpProxy
from tests.support.store import aread_table, change, oracle
from tests.support.stream import history, row_version
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

EVENTS = 20_000
ORGS = list(range(1, 31))
INDEXERS = 3
STREAM_S = 45.0 * int(os.environ.get("FAULT_ROUNDS") or 2)  # a round of the four faults: ~36 s here
Figure = Callable[[str], None]


def log(message: str) -> None:
    print(f"[fault rounds {time.strftime('%H:%M:%S')}] {message}", flush=True)


@pytest.mark.timeout(480)
async def test_fault_rounds_lose_nothing_and_leave_no_stale_cache(
    rabbit: RabbitCluster, redis_nodes: RedisCluster, settings: Settings, tmp_path: Path, unique: str
) -> None:
    seed = int(os.environ.get("FAULT_SEED") or random.randrange(2**32))
    cycles = int(os.environ.get("FAULT_ROUNDS") or 2)
    stream_s = STREAM_S
    log(f"FAULT_SEED={seed}  logs in {tmp_path}")
    rng = random.Random(seed)
    stream: list[Change] = []
    mention = 1
    while len(stream) < EVENTS:
        stream += history(rng, range(mention, mention + 100), ORGS)
        mention += 100
    rng.shuffle(stream)
    log(f"{len(stream)} events for {mention - 1} mentions in {len(ORGS)} organizations")

    redis_url = redis_nodes.nodes[0].url
    base = settings.model_copy(update={"redis_url": redis_url, "redis_min_replicas": 1, "amqp_url": rabbit.urls[0]})
    postgres = TcpProxy.for_url(settings.database_url).start()
    processes: list[IndexerProcess] = []
    for i in range(INDEXERS):
        urls = rabbit.urls[i:] + rabbit.urls[:i]
        own = base.model_copy(update={"amqp_url": ",".join(urls), "database_url": postgres.url(settings.database_url)})
        processes.append(IndexerProcess(own, tmp_path / f"indexer-{i}.log"))
    source_schema = f"{unique}_expected"
    figures: list[str] = []

    def figure(line: str) -> None:
        figures.append(line)
        log(line)

    started = time.monotonic()
    try:
        for p in processes:
            p.start(wait_ready=False)
        for p in processes:
            await p.wait_ready(timeout_s=60)
        log(f"3 indexers ready in {time.monotonic() - started:.1f} s")
        leader = await asyncio.to_thread(rabbit.leader_index, settings.queue)
        members = (await asyncio.to_thread(rabbit.queue, settings.queue))["members"]
        log(f"queue {settings.queue}: quorum, leader on node {leader}, members {members}")

        filler = CacheFiller(redis_nodes.nodes[1].url, settings.cache_prefix, ORGS)
        async with ClusterPublisher(base, [*rabbit.urls[1:], rabbit.urls[0]]) as publisher:
            with Watcher(processes) as watcher:
                # Spread over STREAM_S, so that it flows through every round.
                publisher.start(stream, chunk=50, interval_s=stream_s / (len(stream) / 50))
                filler.start()
                await watcher.wait_batches(range(INDEXERS), started, 30, "first batches")
                for cycle in range(cycles):
                    await kill_an_indexer(processes, watcher, cycle % INDEXERS, figure)
                    await settle(processes, watcher)
                    await kill_a_broker_node(rabbit, settings.queue, processes, watcher, figure)
                    await settle(processes, watcher)
                    await kill_a_redis_primary(redis_nodes, base, publisher, watcher, figure, cycle)
                    await settle(processes, watcher)
                    await cut_postgres(postgres, processes, watcher, figure)
                    await settle(processes, watcher)
                rounds_done = time.monotonic()
                figure(
                    f"{4 * cycles} rounds in {rounds_done - started:.1f} s;"
                    f" {len(publisher.confirmed)} of {len(stream)} events confirmed by then"
                )
                await publisher.finished()
                published = time.monotonic()
                outages = ", ".join(f"{s:.2f}" for _, s in publisher.outages) or "none"
                figure(
                    f"publisher: all {len(stream)} confirmed {published - started:.1f} s after the start;"
                    f" interruptions {outages} s; {publisher.republished} sent again"
                )

                expected = oracle(publisher.confirmed.values())
                direct_url = settings.database_url

                async def drained() -> bool:
                    for i, p in enumerate(processes):
                        assert p.running, f"indexer {i} exited\n{p.tail()}"
                    ready, consumers = await queue_state(rabbit.urls[0], settings.queue)
                    return (
                        ready == 0
                        and consumers == INDEXERS
                        and await aread_table(direct_url, base.schema_name) == expected
                    )

                try:
                    await eventually(drained, timeout_s=120, interval_s=0.5, what="queue drained, table == oracle")
                except AssertionError:
                    table = await aread_table(direct_url, base.schema_name)
                    wrong = [m for m in expected if table.get(m) != expected[m]]
                    ready, consumers = await queue_state(rabbit.urls[0], settings.queue)
                    raise AssertionError(
                        f"{len(wrong)} rows differ from the oracle ({ready} ready, {consumers} consumers), e.g. "
                        + "; ".join(f"{m}: {table.get(m)} != {expected[m]}" for m in wrong[:3])
                        + "\n"
                        + "\n".join(p.tail(40) for p in processes)
                    ) from None
                figure(
                    f"drained {time.monotonic() - published:.1f} s after the last confirm;"
                    f" whole stream {time.monotonic() - started:.1f} s"
                )
                await filler.stop()
                figure(f"cache filler: {filler.passes} passes, {filler.fills} reads, {filler.errors} errors")

            # Nothing left unacknowledged: once the indexers stopped, the queue holds nothing.
            for p in processes:
                code, elapsed = await asyncio.to_thread(p.terminate)
                assert code == 0 and elapsed < 10, p.tail()
            ready, consumers = await queue_state(rabbit.urls[0], settings.queue)
            assert (ready, consumers) == (0, 0), (ready, consumers)
            dead, _ = await queue_state(rabbit.urls[0], settings.dlq)
            assert dead == 0, f"{dead} dead letters"

        table = await aread_table(settings.database_url, base.schema_name)
        lost = [
            c
            for c in publisher.confirmed.values()
            if (row := table.get(c.mention_id)) is None or row_version(row) < version_key(c)
        ]
        different = [m for m in set(expected) | set(table) if table.get(m) != expected.get(m)]
        figure(
            f"{len(publisher.confirmed)} changes confirmed: {len(lost)} lost; {len(table)} rows,"
            f" {len(different)} different from the oracle"
        )
        assert not lost and not different

        query = create_source(settings.database_url, source_schema, expected)
        audit_settings = base.model_copy(update={"source_database_url": settings.database_url})
        result = await arun_cli(cli_env(audit_settings), "audit", "--json", "--source-query", query, timeout_s=120)
        found = json.loads(result.out.strip().splitlines()[-1]) if result.out.strip() else {}
        figure(f"audit: exit {result.code}; read_model {found.get('read_model')}; cache {found.get('cache')}")
        assert result.code == 0, result
        read_model, cache = found["read_model"], found["cache"]
        assert (read_model["missing"], read_model["extra"], read_model["changed"]) == (0, 0, 0), found
        assert read_model["checked"] > 0 and cache["checked"] > 0, found
        assert cache["stale"] == 0, found
        figure(f"whole test body {time.monotonic() - started:.1f} s")
    finally:
        for p in processes:
            p.stop()
        postgres.close()
        drop_schema(settings.database_url, source_schema)
        print("\n".join(["== figures ==", *figures]))
        for p in processes:
            print(p.tail(80))


# ---- the rounds ----------------------------------------------------------------------------------


async def settle(processes: list[IndexerProcess], watcher: Watcher, pause_s: float = 1.0) -> None:
    """Every indexer running, ready and acknowledging, then a short pause: the next round begins."""
    for p in processes:
        await p.wait_ready(timeout_s=60)
    before = await asyncio.to_thread(baseline, watcher, range(len(processes)))
    await watcher.wait_more(before, time.monotonic(), 60, "settling")
    await asyncio.sleep(pause_s)


def baseline(watcher: Watcher, indexes: range | list[int]) -> dict[int, float | None]:
    return {i: watcher.batches_now(i) for i in indexes}


def spread(seconds: dict[int, float]) -> str:
    values = sorted(seconds.values())
    return f"{values[0]:.2f}" if len(values) == 1 else f"{values[0]:.2f}-{values[-1]:.2f}"


async def kill_an_indexer(processes: list[IndexerProcess], watcher: Watcher, victim: int, figure: Figure) -> None:
    others = [i for i in range(len(processes)) if i != victim]
    processes[victim].kill()
    killed = time.monotonic()
    seconds = await watcher.wait_more(baseline(watcher, others), killed, 30, "the others after the kill")
    await asyncio.sleep(2.0)  # a backlog builds up while it is down
    restarted = time.monotonic()
    processes[victim].start(wait_ready=False)
    await processes[victim].wait_ready(timeout_s=60)
    ready_s = time.monotonic() - restarted
    own = await watcher.wait_more({victim: 0.0}, restarted, 60, "the restarted indexer")
    figure(
        f"kill -9 indexer {victim}: the others' next batch {spread(seconds)} s after the kill; restarted"
        f" 2 s later: ready in {ready_s:.2f} s, its first batch {own[victim]:.2f} s after the restart"
    )


async def kill_a_broker_node(
    rabbit: RabbitCluster, queue: str, processes: list[IndexerProcess], watcher: Watcher, figure: Figure
) -> None:
    leader = await asyncio.to_thread(rabbit.leader_index, queue)
    connected = await asyncio.to_thread(consumer_nodes, rabbit, queue)
    by_pid = {p.pid: i for i, p in enumerate(processes)}
    on_node = {by_pid[pid]: node for pid, node in connected.items() if pid in by_pid}
    assert len(on_node) == len(processes), f"consumer connections {connected}, indexers {list(by_pid)}"
    victim_node = leader if leader in on_node.values() else next(iter(on_node.values()))
    affected = sorted(i for i, node in on_node.items() if node == victim_node)
    killed = await asyncio.to_thread(rabbit.kill, victim_node)
    # Read after the kill: whatever they acknowledge from now on went through another node.
    before = await asyncio.to_thread(baseline, watcher, range(len(processes)))
    seconds = await watcher.wait_more(before, killed, 60, f"after kill -9 of broker node {victim_node}")
    ready = {i: await asyncio.to_thread(processes[i].readyz) for i in affected}
    new_leader = await asyncio.to_thread(rabbit.leader_index, queue)
    restart_s = await asyncio.to_thread(rabbit.start, victim_node)
    after = await asyncio.to_thread(consumer_nodes, rabbit, queue)
    figure(
        f"kill -9 broker node {victim_node} (queue leader: {victim_node == leader}; consumers of indexers"
        f" {affected} on it): their next batch {spread({i: seconds[i] for i in affected})} s after the kill,"
        f" every indexer's {spread(seconds)} s; /readyz of those then {[r and r[0] for r in ready.values()]};"
        f" new leader node {new_leader}; node back and rejoined in {restart_s:.1f} s;"
        f" consumers now on nodes {sorted(after.values())}"
    )


async def kill_a_redis_primary(
    redis_nodes: RedisCluster,
    settings: Settings,
    publisher: ClusterPublisher,
    watcher: Watcher,
    figure: Figure,
    cycle: int,
) -> None:
    """Quiet organizations (none of the stream's) on the victim get an entry filled, then a change:
    the primary is killed the moment their entries are gone from it.  After the failover no entry
    of theirs may come back (an invalidation acknowledged but lost with the primary would)."""
    prefix = settings.cache_prefix

    def slot(org: int) -> int:
        return key_slot(epoch_key(prefix, org).encode())

    primaries = redis_nodes.primaries_now()
    victim = max(primaries, key=lambda p: sum(p.owns(slot(o)) for o in ORGS))
    orgs = sum(victim.owns(slot(o)) for o in ORGS)
    quiet = [o for o in range(1000 + 100 * cycle, 1100 + 100 * cycle) if victim.owns(slot(o))][:6]
    keys = [data_key(prefix, o, "quiet") for o in quiet]
    other = next(p for p in primaries if p.port != victim.port)
    async with AsyncCacheReader(other.url, prefix) as reader:
        for o in quiet:
            await reader.get_or_fill(o, "quiet", lambda: b"filled before the change")
    admin = redis_nodes.client(decode_responses=False)
    try:
        assert admin.exists(*keys) == len(keys)
        mention_ids = [5_000_000 + 100 * cycle + k for k in range(len(quiet))]
        await publisher.publish_now(
            [change(Kind.INSERTED, m, o, ts_s=1.0) for m, o in zip(mention_ids, quiet, strict=True)]
        )

        async def invalidated() -> bool:
            return await asyncio.to_thread(admin.exists, *keys) == 0

        await eventually(invalidated, timeout_s=30, interval_s=0.01, what="quiet organizations invalidated")
    finally:
        admin.close()
    killed = await asyncio.to_thread(redis_nodes.kill, victim)
    failover_s = await asyncio.to_thread(redis_nodes.wait_failover, victim)
    restart_s = await asyncio.to_thread(redis_nodes.start, victim)
    restarted = time.monotonic()
    before = await asyncio.to_thread(baseline, watcher, range(len(watcher.watched)))
    seconds = await watcher.wait_more(before, restarted, 60, "after the Redis primary came back")
    admin = redis_nodes.client(decode_responses=False)
    try:
        survived = [k for k in keys if admin.exists(k)]
    finally:
        admin.close()
    assert not survived, f"entries invalidated before the failover came back: {survived}"
    loads: list[int] = []

    def load(org: int) -> bytes:
        loads.append(org)
        return b"after the change"

    async with AsyncCacheReader(other.url, prefix) as reader:
        for o in quiet:
            await reader.get_or_fill(o, "quiet", functools.partial(load, o))
    assert loads == quiet, "the helper served an entry filled before the change"
    figure(
        f"kill -9 Redis primary :{victim.port} ({orgs} of {len(ORGS)} organizations; killed the moment"
        f" {len(quiet)} quiet organizations were invalidated on it): failover {failover_s:.2f} s, old primary"
        f" back as a replica {restart_s:.2f} s later; every indexer's next batch {spread(seconds)} s after"
        f" that ({restarted - killed + max(seconds.values()):.2f} s after the kill); 0 invalidations lost"
    )


async def cut_postgres(postgres: TcpProxy, processes: list[IndexerProcess], watcher: Watcher, figure: Figure) -> None:
    postgres.cut()
    cut = time.monotonic()
    await asyncio.sleep(4.0)
    not_ready = [i for i, p in enumerate(processes) if (p.readyz() or (0,))[0] == 503]
    before = await asyncio.to_thread(baseline, watcher, range(len(processes)))
    postgres.restore()
    restored = time.monotonic()
    seconds = await watcher.wait_more(before, restored, 60, "after Postgres came back")
    for p in processes:
        await p.wait_ready(timeout_s=30)
    ready_s = time.monotonic() - restored
    figure(
        f"Postgres cut {restored - cut:.1f} s (/readyz 503 meanwhile: indexers {not_ready}): every indexer's"
        f" next batch {spread(seconds)} s after the restore; all /readyz 200 {ready_s:.2f} s after it"
    )
