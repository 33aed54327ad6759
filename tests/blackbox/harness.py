"""The outsider's tools: start the product as a subprocess (tests/support/process.py), publish with
pika, read Postgres with psycopg and Redis with redis-py, using only the names the product
documents.  Nothing here imports ``indexer``, nor do the helpers it uses from tests/support/."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
import psycopg
import redis
from psycopg import sql

from tests.support.process import Indexer, Result, clean_environment, free_port, run_cli
from tests.support.tables import read_mentions
from tests.support.waiting import eventually_sync

SENTINEL_BASE = 10**17  # mention ids of barrier() rows
SENTINEL_ORG = 999_999_999


@dataclass
class Letter:
    body: bytes
    properties: pika.BasicProperties
    routing_key: str

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})


@dataclass
class BlackBox:
    """Everything one test owns: unique names, its processes, its connections; ``close`` cleans up."""

    database_url: str
    redis_url: str
    amqp_url: str
    unique: str
    tmp: Path
    schema: str = ""
    exchange: str = ""
    queue: str = ""
    prefix: str = ""
    extra_queues: list[str] = field(default_factory=list)
    extra_schemas: list[str] = field(default_factory=list)
    extra_databases: list[str] = field(default_factory=list)
    indexers: list[Indexer] = field(default_factory=list)
    _amqp: pika.BlockingConnection | None = None
    _channel: Any = None
    _redis: redis.Redis | None = None
    _barriers: int = 0

    def __post_init__(self) -> None:
        u = self.unique
        self.schema = f"{u}_idx"
        self.exchange = f"{u}.events"
        self.queue = f"{u}.indexer"
        self.prefix = f"{u}-mentions"

    @property
    def dlq(self) -> str:
        return f"{self.queue}.dlq"

    # ---- environment and commands ------------------------------------------------------------

    def env(self, **extra: str | None) -> dict[str, str]:
        """The environment of a command or indexer of this test; a variable given as None is left out."""
        ours: dict[str, str | None] = {
            "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url, "AMQP_URL": self.amqp_url,
            "INDEXER_SCHEMA": self.schema, "INDEXER_EXCHANGE": self.exchange, "INDEXER_QUEUE": self.queue,
            "INDEXER_CACHE_PREFIX": self.prefix, "INDEXER_HTTP_PORT": "0", "PYTHONUNBUFFERED": "1",
        }
        return clean_environment(**{k: v for k, v in {**ours, **extra}.items() if v is not None})

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout_s: float = 60, **extra: str | None) -> Result:
        return run_cli(env or self.env(**extra), *args, timeout_s=timeout_s)

    def indexer(self, *, start: bool = True, args: Iterable[str] = (), **extra: str | None) -> Indexer:
        extra.setdefault("INDEXER_HTTP_PORT", str(free_port()))
        proc = Indexer(self.env(**extra), self.tmp / f"indexer-{len(self.indexers)}.log", args)
        self.indexers.append(proc)
        if start:
            proc.start()
        return proc

    # ---- RabbitMQ (pika) ---------------------------------------------------------------------

    @property
    def channel(self) -> Any:
        if self._channel is None or self._channel.is_closed:
            if self._amqp is None or self._amqp.is_closed:
                self._amqp = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
            self._channel = self._amqp.channel()
            self._channel.confirm_delivery()
        return self._channel

    def publish(self, body: bytes, routing_key: str = "events.MentionInserted", *,
                content_type: str | None = "application/x-protobuf", exchange: str | None = None,
                **properties: Any) -> None:
        """Publish with confirms and mandatory: raises unless the broker confirmed and routed it."""
        props = pika.BasicProperties(content_type=content_type, delivery_mode=2, **properties)
        self.channel.basic_publish(exchange if exchange is not None else self.exchange, routing_key, body,
                                   properties=props, mandatory=True)

    def queue_depth(self, name: str) -> int | None:
        """Ready messages (passive declare); None if the queue does not exist."""
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            return int(connection.channel().queue_declare(name, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker:
            return None
        finally:
            if connection.is_open:
                connection.close()

    def _rabbitmqctl(self, *args: str) -> subprocess.Popen[str] | None:
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            return None
        vhost = unquote(urlsplit(self.amqp_url).path[1:]) or "/"
        return subprocess.Popen([ctl, "-q", *args[:1], "-p", vhost, "--no-table-headers", *args[1:]],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def unacked(self, name: str) -> int | None:
        """Messages of ``name`` delivered to a consumer and not yet acknowledged, live from the
        consumers' channels (``list_queues`` counts of quorum queues lag by seconds); None
        without rabbitmqctl."""
        consumers = self._rabbitmqctl("list_consumers", "queue_name", "channel_pid")
        channels = self._rabbitmqctl("list_channels", "pid", "messages_unacknowledged")
        if consumers is None or channels is None:
            return None
        ours = {line.split("\t")[1] for line in consumers.communicate(timeout=30)[0].splitlines()
                if line.split("\t")[0] == name}
        total = 0
        for line in channels.communicate(timeout=30)[0].splitlines():
            pid, _, count = line.partition("\t")
            if pid in ours:
                total += int(count)
        return total

    def queue_counts(self, name: str) -> tuple[int, int]:
        """(ready, unacknowledged) of ``name``."""
        unacked = self.unacked(name)
        return self.queue_depth(name) or 0, unacked if unacked is not None else 0

    def wait_acked(self, queue: str | None = None, timeout_s: float = 20) -> None:
        """Until everything published so far has been acknowledged.

        A barrier first: once its row is committed, every earlier message has reached the
        indexer (one consumer, one FIFO queue), so none is in flight between the queue and the
        channel; then nothing may be ready or unacknowledged."""
        name = queue or self.queue
        self.barrier(timeout_s=timeout_s)

        def done() -> bool:
            if (self.queue_depth(name) or 0) != 0:
                return False
            unacked = self.unacked(name)
            if unacked is None:  # no rabbitmqctl: the ack follows the commit closely
                time.sleep(0.3)
                return True
            return unacked == 0

        eventually_sync(done, timeout_s=timeout_s, interval_s=0.05, what=f"every message of {name} acknowledged")

    def take_letters(self, count: int, timeout_s: float = 20, queue: str | None = None) -> list[Letter]:
        """Wait for ``count`` messages in the DLQ, then consume them all (and check no more come)."""
        name = queue or self.dlq
        eventually_sync(lambda: (self.queue_depth(name) or 0) >= count, timeout_s=timeout_s,
                        what=f"{count} message(s) in {name}")
        letters = []
        channel = self.channel
        while True:
            method, props, body = channel.basic_get(name, auto_ack=True)
            if method is None:
                break
            letters.append(Letter(body, props, method.routing_key))
        return letters

    def tap(self, binding: str = "#") -> str:
        """A queue of our own bound to the exchange: sees what producers publish."""
        name = f"{self.unique}.tap{len(self.extra_queues)}"
        self.channel.queue_declare(name, durable=True)
        self.channel.queue_bind(name, self.exchange, binding)
        self.extra_queues.append(name)
        return name

    def get(self, queue: str, timeout_s: float = 10) -> tuple[Any, pika.BasicProperties, bytes]:
        def one() -> Any:
            method, props, body = self.channel.basic_get(queue, auto_ack=True)
            return (method, props, body) if method is not None else None

        return eventually_sync(one, timeout_s=timeout_s, what=f"a message in {queue}")

    # ---- Postgres ----------------------------------------------------------------------------

    def sql(self, query: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def barrier(self, timeout_s: float = 20) -> None:
        """Publish an Insert of a fresh sentinel mention and wait for its row: everything published
        before it has been committed (one queue is FIFO), and what follows lands in a later batch."""
        from tests.blackbox import pb

        self._barriers += 1
        mention_id = SENTINEL_BASE + self._barriers
        self.publish(pb.mention_event("Inserted", mention_id, SENTINEL_ORG, "2000-01-01T00:00:00Z"))
        self.wait_row(mention_id, timeout_s=timeout_s)

    def rows(self, *, sentinels: bool = False) -> dict[int, tuple[Any, ...]]:
        """mention_id → (organization_id, mention_date, transaction_timestamp, deleted); barriers left
        out; nothing before the table exists."""
        table = read_mentions(self.database_url, self.schema, missing_ok=True)
        return {mention_id: row for mention_id, row in table.items() if sentinels or mention_id < SENTINEL_BASE}

    def row(self, mention_id: int) -> tuple[Any, ...] | None:
        return self.rows().get(mention_id)

    def wait_row(self, mention_id: int, predicate: Callable[[tuple[Any, ...]], bool] = lambda r: True,
                 timeout_s: float = 20) -> tuple[Any, ...]:
        def check() -> Any:
            r = self.rows(sentinels=True).get(mention_id)
            return r if r is not None and predicate(r) else None

        return eventually_sync(check, timeout_s=timeout_s, what=f"row of mention {mention_id}")

    # ---- Redis -------------------------------------------------------------------------------

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url)
        return self._redis

    def org_key(self, org: int | str, name: str = "k") -> str:
        return f"{self.prefix}:{{{org}}}:{name}"

    def existing(self, keys: Iterable[str]) -> set[str]:
        return {k for k in keys if self.redis.exists(k)}

    # ---- cleanup -----------------------------------------------------------------------------

    def close(self) -> None:
        for proc in self.indexers:
            proc.kill()  # tests that care about SIGTERM send it themselves; unacked messages go back
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
            for name in [self.queue, self.dlq, *self.extra_queues]:
                channel = connection.channel()
                try:
                    channel.queue_delete(name)
                except Exception:
                    pass
            channel = connection.channel()
            try:
                channel.exchange_delete(self.exchange)
            except Exception:
                pass
            connection.close()
        except Exception:
            pass
        if self._amqp is not None and self._amqp.is_open:
            try:
                self._amqp.close()
            except Exception:
                pass
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            for schema in [self.schema, *self.extra_schemas]:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            for database in self.extra_databases:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        keys = list(self.redis.scan_iter(match=f"{self.unique}*", count=1000))
        if keys:
            self.redis.delete(*keys)
        self.redis.close()


MASKED_PASSWORD = re.compile(r"://[^/\s:@]*:\*+@")
