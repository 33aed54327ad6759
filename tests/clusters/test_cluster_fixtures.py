"""The cluster fixtures themselves: a 3-node RabbitMQ cluster whose quorum queues replicate and
survive kill -9 of their leader, a 3+3 Redis Cluster that fails over and notifies per primary, and
nothing of either left behind afterwards (the last test).

Timings (start-up, first publish after a leader kill, failover) are printed in the "cluster timings"
section at the end of the run.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import redis
from pika.adapters.blocking_connection import BlockingChannel
from redis.crc import key_slot

from tests.support import clusters
from tests.support.clusters import RabbitCluster, RedisCluster, record_timing, redis_command, redis_commands
from tests.support.services import DEFAULTS
from tests.support.waiting import eventually_sync

QUORUM = {"x-queue-type": "quorum"}
AMQP_ERRORS = (pika.exceptions.AMQPError, OSError)


@contextmanager
def channel(url: str, *, confirms: bool = True) -> Iterator[BlockingChannel]:
    params = pika.URLParameters(url + "?connection_attempts=1&socket_timeout=5&heartbeat=30&blocked_connection_timeout=10")
    connection = pika.BlockingConnection(params)
    try:
        ch = connection.channel()
        if confirms:
            ch.confirm_delivery()
        yield ch
    finally:
        if connection.is_open:
            try:
                connection.close()
            except AMQP_ERRORS:
                pass


def publish(ch: BlockingChannel, queue: str, body: bytes) -> None:
    """Publish persistent and mandatory; returns once the broker confirmed (raises otherwise)."""
    ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)


def qname(cluster: RabbitCluster, what: str) -> str:
    return f"{cluster.id}.{what}.{uuid.uuid4().hex[:8]}"


def drain(url: str, queue: str, timeout_s: float = 30) -> set[bytes]:
    """Every message of ``queue`` by ``basic.get`` (acked after it is recorded), reconnecting when the
    broker closes the connection (``541 ... nodedown`` right after a leader died), until it is empty."""
    got: set[bytes] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with channel(url, confirms=False) as ch:
                while True:
                    method, _props, body = ch.basic_get(queue)
                    if method is None:
                        if ch.queue_declare(queue, passive=True).method.message_count == 0:
                            return got
                        continue
                    got.add(body)
                    ch.basic_ack(method.delivery_tag)
        except AMQP_ERRORS:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --- RabbitMQ ---------------------------------------------------------------------------------


def test_a_quorum_queue_replicates_to_all_three_nodes(rabbit: RabbitCluster) -> None:
    assert len(set(rabbit.names)) == 3 and all(n.startswith(f"rabbit-{rabbit.id}-") for n in rabbit.names)
    assert sorted(rabbit.running_nodes()) == sorted(rabbit.names)
    queue = qname(rabbit, "qq")
    with channel(rabbit.urls[0]) as ch:
        ch.queue_declare(queue, durable=True, arguments=QUORUM)
    try:
        info = rabbit.queue(queue)
        assert info["type"] == "quorum"
        assert sorted(info["members"]) == sorted(rabbit.names)
        assert sorted(info["online"]) == sorted(rabbit.names)
        assert info["leader"] in rabbit.names
        status = rabbit.ctl_json(1, "quorum_status", queue, tool="rabbitmq-queues")
        states = sorted(row["Raft State"] for row in status)
        assert sorted(row["Node Name"] for row in status) == sorted(rabbit.names), status
        assert states == ["follower", "follower", "leader"], status
    finally:
        with channel(rabbit.urls[0], confirms=False) as ch:
            ch.queue_delete(queue)


def test_published_with_confirms_on_node_1_consumed_on_node_2(rabbit: RabbitCluster) -> None:
    queue = qname(rabbit, "across")
    body = f"across-{uuid.uuid4().hex}".encode()
    with channel(rabbit.urls[0]) as ch:
        ch.queue_declare(queue, durable=True, arguments=QUORUM)
        publish(ch, queue, body)
    try:
        with channel(rabbit.urls[1], confirms=False) as ch:
            method, _props, got = eventually_sync(lambda: (r := ch.basic_get(queue))[0] and r,
                                                  timeout_s=10, what="the message on node 2")
            assert got == body
            ch.basic_ack(method.delivery_tag)
            assert ch.queue_declare(queue, passive=True).method.message_count == 0
    finally:
        with channel(rabbit.urls[0], confirms=False) as ch:
            ch.queue_delete(queue)


def test_after_kill_9_of_the_leader_the_queue_goes_on_and_loses_nothing_confirmed(rabbit: RabbitCluster) -> None:
    queue = qname(rabbit, "failover")
    with channel(rabbit.urls[0]) as ch:
        ch.queue_declare(queue, durable=True, arguments=QUORUM)
    leader = rabbit.leader_index(queue)
    others = [i for i in range(3) if i != leader]
    confirmed: set[bytes] = set()
    # Before: half through the leader's own node, half through another one.
    for node in (leader, others[0]):
        with channel(rabbit.urls[node]) as ch:
            for n in range(50):
                body = f"before-{node}-{n}".encode()
                publish(ch, queue, body)
                confirmed.add(body)

    killed_at = rabbit.kill(leader)
    assert not clusters.answers(rabbit.nodes[leader].amqp_port)

    # Publish on a surviving node until the broker confirms again.
    first_after: float | None = None
    attempts = 0
    while first_after is None:
        attempts += 1
        try:
            with channel(rabbit.urls[others[0]]) as ch:
                for n in range(50):
                    body = f"after-{attempts}-{n}".encode()
                    publish(ch, queue, body)
                    confirmed.add(body)
                    if first_after is None:
                        first_after = time.monotonic() - killed_at
        except AMQP_ERRORS:
            if time.monotonic() - killed_at > 30:
                raise
            time.sleep(0.1)
    record_timing("RabbitMQ quorum queue: first confirmed publish on another node after kill -9 of its leader",
                  first_after)
    assert first_after < 30

    new_leader = rabbit.queue(queue, which=others[0])["leader"]
    assert new_leader in {rabbit.names[i] for i in others}, new_leader
    assert sorted(rabbit.running_nodes(others[1])) == sorted(rabbit.names[i] for i in others)

    got = drain(rabbit.urls[others[1]], queue)
    assert confirmed - got == set(), f"{len(confirmed - got)} confirmed messages lost"
    assert got <= confirmed
    assert len(confirmed) == 150

    # The killed node boots again and rejoins: a member of the queue again, and serving it.
    rabbit.start(leader)
    assert sorted(rabbit.running_nodes(leader)) == sorted(rabbit.names)
    eventually_sync(lambda: sorted(rabbit.queue(queue, which=leader)["online"]) == sorted(rabbit.names),
                    timeout_s=30, interval_s=0.5, what="the restarted node back online in the queue")
    with channel(rabbit.urls[leader]) as ch:
        publish(ch, queue, b"after-restart")
    assert drain(rabbit.urls[leader], queue) == {b"after-restart"}
    with channel(rabbit.urls[leader], confirms=False) as ch:
        ch.queue_delete(queue)


# --- Redis Cluster ----------------------------------------------------------------------------


def keys_per_primary(cluster: RedisCluster, prefix: str) -> dict[str, str]:
    """One key per live primary (node id -> key), found by hashing candidates to slots."""
    primaries = cluster.primaries_now()
    keys: dict[str, str] = {}
    n = 0
    while len(keys) < len(primaries):
        key = f"{prefix}:{n}"
        owner = next(p for p in primaries if p.owns(key_slot(key.encode())))
        keys.setdefault(owner.node_id, key)
        n += 1
    return keys


def test_the_redis_cluster_has_three_primaries_each_with_a_replica(redis_nodes: RedisCluster) -> None:
    nodes = redis_nodes.nodes
    primaries = [n for n in nodes if n.role == "primary"]
    assert len(nodes) == 6 and len(primaries) == 3
    assert sum(hi - lo + 1 for p in primaries for lo, hi in p.slots) == 16384
    for p in primaries:
        assert [r.port for r in redis_nodes.replicas_of(p)], f"{p.port} has no replica"
    assert all(port >= 20000 and port not in (6379, 16379) for port in redis_nodes.ports)


def test_keyspace_notifications_set_on_every_primary_arrive_for_keys_on_each(redis_nodes: RedisCluster) -> None:
    primaries = redis_nodes.primaries_now()
    assert len(primaries) == 3
    keys = keys_per_primary(redis_nodes, f"{redis_nodes.id}:ks:{uuid.uuid4().hex[:6]}")
    subscribers: dict[str, tuple[redis.Redis, Any]] = {}
    try:
        for p in primaries:
            assert redis_command(p.port, "CONFIG", "SET", "notify-keyspace-events", "KEA") == "OK"
        # CONFIG SET is per node: neither gossiped nor replicated.
        for p in primaries:
            for replica in redis_nodes.replicas_of(p):
                reply = redis_command(replica.port, "CONFIG", "GET", "notify-keyspace-events")
                assert dict(reply if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)) == {
                    "notify-keyspace-events": ""}, (replica.port, reply)
        for p in primaries:
            client = redis.Redis(host=p.host, port=p.port, decode_responses=True, socket_timeout=5)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.psubscribe(f"__keyspace@0__:{redis_nodes.id}:ks:*")
            subscribers[p.node_id] = (client, pubsub)
            # The psubscribe reply is read (and swallowed) by get_message; then ``subscribed`` is set.
            eventually_sync(lambda ps=pubsub: ps.get_message(timeout=0.1) is None and ps.subscribed,
                            timeout_s=5, what="subscribed")
        with closing(redis_nodes.client()) as rc:
            for key in keys.values():
                assert rc.set(key, "x") is True
        for node_id, (_client, pubsub) in subscribers.items():
            seen: list[tuple[str, str]] = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (f"__keyspace@0__:{keys[node_id]}", "set") not in seen:
                message = pubsub.get_message(timeout=0.2)
                if message:
                    seen.append((message["channel"], message["data"]))
            time.sleep(0.2)  # and nothing about the other primaries' keys
            while message := pubsub.get_message(timeout=0.1):
                seen.append((message["channel"], message["data"]))
            assert seen == [(f"__keyspace@0__:{keys[node_id]}", "set")], (node_id, seen)
    finally:
        for client, pubsub in subscribers.values():
            pubsub.close()
            client.close()
        for p in primaries:
            redis_command(p.port, "CONFIG", "SET", "notify-keyspace-events", "")
        with closing(redis_nodes.client()) as rc:
            for key in keys.values():
                rc.delete(key)


def test_a_key_survives_kill_9_of_its_primary_after_the_replica_is_promoted(redis_nodes: RedisCluster) -> None:
    key = f"{redis_nodes.id}:failover:{uuid.uuid4().hex[:8]}"
    with closing(redis_nodes.client()) as rc:
        assert rc.set(key, "v1") is True
        assert rc.get(key) == "v1"
        primary = redis_nodes.primary_for(key)
        (replica,) = redis_nodes.replicas_of(primary)
        # Replication is asynchronous: kill only once the replica has the key.
        eventually_sync(lambda: redis_commands(replica.port, ("READONLY",), ("GET", key))[1] == "v1",
                        timeout_s=10, what="the key on the replica")

        killed_at = redis_nodes.kill(primary)
        failover_s = redis_nodes.wait_failover(primary)
        record_timing(f"Redis failover after kill -9 of a primary (cluster-node-timeout "
                      f"{redis_nodes.node_timeout_ms} ms)", failover_s)
        assert failover_s < 30
        promoted = redis_nodes.primary_for(key)
        assert promoted.node_id == replica.node_id and promoted.port == replica.port

        def read() -> str | None:
            try:
                return rc.get(key)
            except redis.RedisError:
                return None

        assert eventually_sync(read, timeout_s=20, what="the key through the cluster client") == "v1"
        record_timing("Redis: key readable through the cluster client after kill -9", time.monotonic() - killed_at)
        assert rc.set(key, "v2") is True and rc.get(key) == "v2"

        # The old primary comes back as the replica of the promoted one.
        redis_nodes.start(primary)
        back = next(n for n in redis_nodes.nodes if n.node_id == primary.node_id)
        assert back.role == "replica" and back.primary_id == replica.node_id
        rc.delete(key)


# --- teardown ---------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes() != b""  # a zombie has no environment left
    except OSError:
        return False


def test_stopping_leaves_nothing_and_the_machine_services_still_answer(
    rabbit_cluster: RabbitCluster, redis_cluster: RedisCluster, machine_services: dict[int, int | None]
) -> None:
    ours = rabbit_cluster.processes() + redis_cluster.processes()
    commands = sorted(comm for _pid, comm in ours)
    # The marker finds every server (or the check below would prove nothing).
    assert commands.count("beam.smp") == 3 and commands.count("epmd") == 1, commands
    assert commands.count("redis-server") == 6, commands
    ports = [p for n in rabbit_cluster.nodes for p in (n.amqp_port, n.dist_port)]
    ports += [rabbit_cluster.epmd_port or 0, *redis_cluster.ports, *redis_cluster.bus_ports.values()]
    assert all(clusters.answers(p) for p in [n.amqp_port for n in rabbit_cluster.nodes] + redis_cluster.ports)
    roots = [rabbit_cluster.root, redis_cluster.root]

    rabbit_cluster.stop()
    redis_cluster.stop()

    assert clusters.processes_of(clusters.ALL_CLUSTER_IDS) == []
    assert [pid for pid, _comm in ours if _alive(pid)] == []
    assert [p for p in ports if clusters.answers(p)] == []
    assert [r for r in roots if r is not None and r.exists()] == []

    # The machine's own broker, epmd and Redis: the same processes, and they answer.
    assert clusters.listener_pids(clusters.MACHINE_SERVICE_PORTS.values()) == machine_services
    with channel(os.environ.get("AMQP_URL") or DEFAULTS["AMQP_URL"], confirms=False) as ch:
        assert ch.is_open
    with closing(redis.Redis.from_url(os.environ.get("REDIS_URL") or DEFAULTS["REDIS_URL"])) as client:
        assert client.ping() is True
