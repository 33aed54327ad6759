"""The outsider's tools: start the product as a subprocess, publish with pika, read Postgres with
psycopg and Redis with redis-py, using only the names SPEC.md gives.  Nothing here imports
``indexer``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
import psycopg
import redis
from psycopg import sql

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")
SENTINEL_BASE = 10**17  # mention ids of barrier() rows
SENTINEL_ORG = 999_999_999
_OUR_VARIABLES = ("DATABASE_URL", "SOURCE_DATABASE_URL", "REDIS_URL", "AMQP_URL")


def eventually(check: Callable[[], T], *, timeout_s: float = 20.0, interval_s: float = 0.05, what: str = "") -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met within {timeout_s}s (last value: {value!r})")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"


class Indexer:
    """``python -m indexer run`` as a subprocess, with its output in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, args: Iterable[str] = ()) -> None:
        self.env = dict(env)
        self.args = list(args)
        self.log_path = log_path
        port = self.env.get("INDEXER_HTTP_PORT", "9180")
        self.port = int(port) if port.isdigit() else 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_ready: bool = True, timeout_s: float = 30) -> Indexer:
        assert not self.running
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "indexer", "run", *self.args], env=self.env, cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log.close()
        if wait_ready:
            self.wait_http("/readyz", 200, timeout_s)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def http(self, path: str) -> tuple[int, str] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return None

    def wait_http(self, path: str, status: int, timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            if not self.running:
                raise AssertionError(f"indexer exited with {self.process and self.process.returncode}\n{self.log()}")
            last = self.http(path)
            if last is not None and last[0] == status:
                return last[1]
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} never answered {status} in {timeout_s}s (last {last})\n{self.log()}")
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        answer = self.http("/metrics")
        assert answer is not None and answer[0] == 200, answer
        samples = {}
        for line in answer[1].splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def terminate(self, timeout_s: float = 10) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if still running after timeout_s, seconds taken)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return f"--- {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])


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

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not (k in _OUR_VARIABLES or k.startswith("INDEXER_"))}
        env.update(
            DATABASE_URL=self.database_url, REDIS_URL=self.redis_url, AMQP_URL=self.amqp_url,
            INDEXER_SCHEMA=self.schema, INDEXER_EXCHANGE=self.exchange, INDEXER_QUEUE=self.queue,
            INDEXER_CACHE_PREFIX=self.prefix, INDEXER_HTTP_PORT="0", PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout_s: float = 60, **extra: str) -> Result:
        done = subprocess.run([sys.executable, "-m", "indexer", *args], env=env or self.env(**extra), cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        return Result(done.returncode, done.stdout, done.stderr)

    def indexer(self, *, start: bool = True, args: Iterable[str] = (), **extra: str) -> Indexer:
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

        eventually(done, timeout_s=timeout_s, interval_s=0.05, what=f"every message of {name} acknowledged")

    def take_letters(self, count: int, timeout_s: float = 20, queue: str | None = None) -> list[Letter]:
        """Wait for ``count`` messages in the DLQ, then consume them all (and check no more come)."""
        name = queue or self.dlq
        eventually(lambda: (self.queue_depth(name) or 0) >= count, timeout_s=timeout_s,
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

        return eventually(one, timeout_s=timeout_s, what=f"a message in {queue}")

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
        """mention_id → (organization_id, mention_date, transaction_timestamp, deleted); barriers left out."""
        query = sql.SQL("SELECT mention_id, organization_id, mention_date, transaction_timestamp, deleted "
                        "FROM {}.mentions").format(sql.Identifier(self.schema))
        try:
            return {r[0]: tuple(r[1:]) for r in self.sql(query) if sentinels or r[0] < SENTINEL_BASE}
        except psycopg.errors.UndefinedTable:
            return {}

    def row(self, mention_id: int) -> tuple[Any, ...] | None:
        return self.rows().get(mention_id)

    def wait_row(self, mention_id: int, predicate: Callable[[tuple[Any, ...]], bool] = lambda r: True,
                 timeout_s: float = 20) -> tuple[Any, ...]:
        def check() -> Any:
            r = self.rows(sentinels=True).get(mention_id)
            return r if r is not None and predicate(r) else None

        return eventually(check, timeout_s=timeout_s, what=f"row of mention {mention_id}")

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
