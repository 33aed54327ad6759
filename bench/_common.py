"""What the benchmarks share: scratch names and their removal, settings, the event mix, fast
publishing, and the report of ``figure, limit, ratio`` (text, or JSON with ``--json``).

Every benchmark works under names of its own (``bench_<name>_<random>``: schema, database,
exchange, queues, key prefix) and removes them when it ends, also on Ctrl-C or SIGTERM, so it can
run beside a live indexer and the test suite on the same services.  The services come from
DATABASE_URL, REDIS_URL and AMQP_URL, or the local defaults, as for the indexer itself.

A figure is printed with its limit measured or fixed in the same run:

    figure <what> <value> <unit>  limit <op> <limit> <unit> (<how the limit is made>)  ratio <value/limit>  ok|MISS

``ratio`` is always figure / limit: a ``>=`` limit is met when the ratio is at least 1, a ``<=``
limit when it is at most 1.  With ``--json`` the one JSON document goes to stdout and the text
lines to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import signal
import struct
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a fresh clone without `pip install -e .` still finds `indexer`
    sys.path.insert(1, str(REPO))

import aio_pika  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402
from aiormq.abc import ChannelFrame  # noqa: E402
from psycopg import sql  # noqa: E402

from indexer.changes import Kind  # noqa: E402
from indexer.config import Settings, load_settings  # noqa: E402
from indexer.ingest import wire  # noqa: E402

log = logging.getLogger("bench")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- command line


def parser(doc: str | None) -> argparse.ArgumentParser:
    """``--json`` and ``--size small|full`` (full: the issue's sizes, the default)."""
    text = doc or ""
    p = argparse.ArgumentParser(description=text.splitlines()[0] if text else None, epilog=None)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (text lines on stderr)")
    p.add_argument(
        "--size",
        choices=("small", "full"),
        default="full",
        help="full (default): the issue's sizes; small: a smoke-test run of a few seconds",
    )
    return p


def sized(args: argparse.Namespace, name: str, full: Any, small: Any) -> Any:
    """``args.<name>`` if given, else the value for ``--size``."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    return small if args.size == "small" else full


def info(message: str) -> None:
    """Progress, always on stderr (stdout is for figures or JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------- the report


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    limit: float | None
    op: str  # ">=" or "<=": how value must compare with limit
    how: str  # how the limit is made, e.g. "0.8 × raw aio-pika consume+ack (12,000 events/s)"

    @property
    def ratio(self) -> float | None:
        if self.limit is None or self.limit == 0:
            return None
        return self.value / self.limit

    @property
    def ok(self) -> bool | None:
        if self.limit is None:
            return None
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def line(self) -> str:
        text = f"figure {self.name} {_fmt(self.value)} {self.unit}"
        if self.limit is None:
            return text + f"  (no limit: {self.how})"
        ratio = self.ratio
        verdict = "ok" if self.ok else "MISS"
        return (
            f"{text}  limit {self.op} {_fmt(self.limit)} {self.unit} ({self.how})"
            f"  ratio {ratio:.2f}  {verdict}"
            if ratio is not None
            else f"{text}  limit {self.op} {_fmt(self.limit)} {self.unit} ({self.how})  {verdict}"
        )

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        out["ok"] = self.ok
        return out


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


@dataclass
class Report:
    benchmark: str
    command: str
    params: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    measurements: dict[str, Any] = field(default_factory=dict)
    """Everything else measured (references, breakdowns, tables), for the JSON document."""
    notes: list[str] = field(default_factory=list)

    def figure(self, name: str, value: float, unit: str, limit: float | None, op: str, how: str) -> Figure:
        fig = Figure(name, float(value), unit, None if limit is None else float(limit), op, how)
        self.figures.append(fig)
        return fig

    def note(self, text: str) -> None:
        self.notes.append(text)

    def emit(self, as_json: bool) -> None:
        out = sys.stderr if as_json else sys.stdout
        print(f"== {self.benchmark} ({self.command}) {datetime.now().date().isoformat()}", file=out)
        for name, value in self.params.items():
            print(f"   {name} = {value}", file=out)
        for text in self.notes:
            print(f"   {text}", file=out)
        for fig in self.figures:
            print(fig.line(), file=out)
        out.flush()
        if as_json:
            document = {
                "benchmark": self.benchmark,
                "command": self.command,
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
                "params": self.params,
                "figures": [fig.as_json() for fig in self.figures],
                "measurements": self.measurements,
                "notes": self.notes,
            }
            print(json.dumps(document, indent=2, default=str), flush=True)


def quantiles_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, max (and count) of durations in seconds, in ms."""
    if not samples_s:
        return {"count": 0, "p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "max": float("nan")}
    ordered = sorted(samples_s)

    def at(q: float) -> float:
        index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
        return ordered[index] * 1000

    return {"count": len(ordered), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": ordered[-1] * 1000}


# --------------------------------------------------------------------------- scratch names


def tag(benchmark: str) -> str:
    """A name valid as SQL identifier, AMQP name and cache prefix: ``bench_<benchmark>_<8 hex>``."""
    return f"bench_{benchmark}_{uuid.uuid4().hex[:8]}"


def settings_for(name: str, **overrides: Any) -> Settings:
    """The service's settings (environment and defaults) under the scratch name ``name``."""
    values: dict[str, Any] = {
        "schema_name": name,
        "exchange": f"{name}.events",
        "queue": f"{name}.q",
        "cache_prefix": name,
        "http_port": 0,
        "log_summary_s": 0,
    }
    values.update(overrides)
    return load_settings(**values)


class Scratch:
    """Remembers every scratch thing created and removes them all at the end (best effort each).

    Use as a context manager; SIGTERM is turned into KeyboardInterrupt so the removal runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.schemas: list[str] = []
        self.databases: list[str] = []
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.prefixes: list[str] = []
        self.keys: list[list[str]] = []  # known key names (deleted without a scan)

    def __enter__(self) -> Scratch:
        def terminate(_signum: int, _frame: Any) -> None:
            raise KeyboardInterrupt

        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, terminate)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        for step, action in (
            ("amqp", self._drop_amqp),
            ("schemas", self._drop_schemas),
            ("databases", self._drop_databases),
            ("redis", self._drop_keys),
        ):
            try:
                action()
            except Exception as exc:  # report, and go on with the others
                print(f"cleanup of {step} failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _drop_schemas(self) -> None:
        if not self.schemas:
            return
        with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
            for schema in self.schemas:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    def _drop_databases(self) -> None:
        if not self.databases:
            return
        with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
            for database in self.databases:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))

    def _drop_keys(self) -> None:
        if not self.prefixes and not self.keys:
            return
        client = redis.Redis.from_url(self.settings.redis_url)
        try:
            for names in self.keys:
                for start in range(0, len(names), 10_000):
                    client.unlink(*names[start : start + 10_000])
            for prefix in self.prefixes:
                # A scan is fine here: the prefix is this run's own, and this is the clean-up.
                batch: list[bytes] = []
                for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
                    batch.append(key)
                    if len(batch) >= 10_000:
                        client.unlink(*batch)
                        batch = []
                if batch:
                    client.unlink(*batch)
        finally:
            client.close()

    def _drop_amqp(self) -> None:
        if not self.queues and not self.exchanges:
            return

        async def drop() -> None:
            connection = await aio_pika.connect(self.settings.amqp_url)
            async with connection:
                channel = await connection.channel()
                for queue in self.queues:
                    await channel.queue_delete(queue)
                for exchange in self.exchanges:
                    await channel.exchange_delete(exchange)

        asyncio.run(drop())

    def service_names(self, s: Settings) -> None:
        """Everything a service of settings ``s`` creates: schema, exchange, queues, key prefix."""
        self.schemas.append(s.schema_name)
        self.exchanges.append(s.exchange)
        self.queues.extend([s.queue, s.dlq])
        self.prefixes.append(s.cache_prefix)


# --------------------------------------------------------------------------- the event mix


@dataclass(frozen=True, slots=True)
class Event:
    routing_key: str
    body: bytes
    kind: str  # insert, update, move, delete, duplicate, stale
    mention_id: int
    organization_id: int


def organization_weights(orgs: int) -> list[float]:
    """A mild Zipf skew: a few busy organizations, a long tail (as real tenants are)."""
    return [1.0 / (rank**0.7) for rank in range(1, orgs + 1)]


def event_body(kind: Kind, mention_id: int, org: int | None, mention_date: datetime | None, at: datetime) -> bytes:
    message = wire.mention_message(kind, mention_id, org, mention_date, at)
    return wire.encode(wire.build_event(message, organization_id=str(org or ""), service_name="bench"))


def mix(count: int, *, orgs: int = 1000, seed: int = 7, first_mention: int = 1, offset_ms: int = 0) -> list[Event]:
    """``count`` events as producers send them: ~75 % inserts of new mentions, 10 % updates (a
    fifth of them moving the mention to another organization), 4 % deletes, 8 % exact duplicates
    (redeliveries of an earlier event) and 3 % stale updates (older than what the row holds).

    Versions are ``T0 + offset_ms + i`` ms; mentions are numbered from ``first_mention``, so
    successive calls (``mix_stream``) continue one stream."""
    rng = random.Random(seed)
    population = range(1, orgs + 1)
    weights = organization_weights(orgs)
    orgs_of = rng.choices(population, weights=weights, k=count + 16)
    kinds = rng.choices(
        ("insert", "update", "delete", "duplicate", "stale"), weights=(75, 10, 4, 8, 3), k=count
    )
    events: list[Event] = []
    current: dict[int, tuple[int, datetime]] = {}  # mention -> (org, version)
    live: list[int] = []
    next_mention = first_mention
    for i, kind in enumerate(kinds):
        at = T0 + timedelta(milliseconds=offset_ms + i, microseconds=1)  # sub-second: RFC3339 on the wire
        if kind != "insert" and not live:
            kind = "insert"
        if kind == "insert":
            mention, org = next_mention, orgs_of[i]
            next_mention += 1
            live.append(mention)
            current[mention] = (org, at)
            date = T0 - timedelta(seconds=rng.randrange(86_400 * 30))
            events.append(Event(f"events.{Kind.INSERTED.event_name}", event_body(Kind.INSERTED, mention, org, date, at),
                                "insert", mention, org))
        elif kind == "update":
            mention = rng.choice(live)
            org, _ = current[mention]
            label = "update"
            if rng.random() < 0.2:
                org, label = orgs_of[i], "move"
            current[mention] = (org, at)
            date = T0 - timedelta(seconds=rng.randrange(86_400 * 30))
            events.append(Event(f"events.{Kind.UPDATED.event_name}", event_body(Kind.UPDATED, mention, org, date, at),
                                label, mention, org))
        elif kind == "delete":
            mention = rng.choice(live)
            org, _ = current[mention]
            current[mention] = (org, at)
            events.append(Event(f"events.{Kind.DELETED.event_name}", event_body(Kind.DELETED, mention, org, None, at),
                                "delete", mention, org))
        elif kind == "duplicate":
            earlier = events[rng.randrange(len(events))]
            events.append(Event(earlier.routing_key, earlier.body, "duplicate", earlier.mention_id,
                                earlier.organization_id))
        else:  # stale: an update older than the row's version
            mention = rng.choice(live)
            org, version = current[mention]
            stale_at = version - timedelta(microseconds=500)
            events.append(Event(f"events.{Kind.UPDATED.event_name}",
                                event_body(Kind.UPDATED, mention, org, T0, stale_at), "stale", mention, org))
    return events


def mix_stream(count: int, *, orgs: int = 1000, chunk: int = 50_000) -> Iterator[tuple[str, bytes]]:
    """``mix`` as (routing key, body) pairs, made ``chunk`` at a time (1,000,000 events need not
    sit in memory)."""
    made = 0
    while made < count:
        n = min(chunk, count - made)
        for event in mix(n, orgs=orgs, seed=made + 7, first_mention=made + 1, offset_ms=made):
            yield event.routing_key, event.body
        made += n


def mix_summary(events: Sequence[Event]) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for event in events:
        kinds[event.kind] = kinds.get(event.kind, 0) + 1
    return {
        "events": len(events),
        "kinds": kinds,
        "organizations": len({e.organization_id for e in events}),
        "mentions": len({e.mention_id for e in events}),
        "mean_body_bytes": round(sum(len(e.body) for e in events) / max(1, len(events)), 1),
    }


# --------------------------------------------------------------------------- RabbitMQ


def _frames(channel: int, exchange: bytes, key: bytes, body: bytes, content_type: bytes) -> bytes:
    """One persistent Basic.Publish as AMQP 0-9-1 frames (method, content header, body)."""
    method = struct.pack(">HHH", 60, 40, 0) + bytes([len(exchange)]) + exchange + bytes([len(key)]) + key + b"\x00"
    header = struct.pack(">HHQH", 60, 0, len(body), 0x8000 | 0x1000) + bytes([len(content_type)]) + content_type + b"\x02"
    return b"".join(
        (
            struct.pack(">BHI", 1, channel, len(method)), method, b"\xce",
            struct.pack(">BHI", 2, channel, len(header)), header, b"\xce",
            struct.pack(">BHI", 3, channel, len(body)), body, b"\xce",
        )
    )


class RawPublisher:
    """Publishes persistent messages to one exchange, with confirms, writing the AMQP frames
    itself: a few µs per message where aio-pika's ``publish`` takes ~100 µs.

    ``publish`` writes at once and returns the confirm's future; ``write_block``
    writes many messages in one frame buffer and waits until the socket took them."""

    def __init__(self, settings: Settings, content_type: str = wire.CONTENT_TYPE) -> None:
        self.settings = settings
        self._ctype = content_type.encode()
        self._exchange = settings.exchange.encode()
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> RawPublisher:
        self._connection = await aio_pika.connect(self.settings.amqp_url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._raw = await self._channel.get_underlay_channel()
        self._loop = asyncio.get_running_loop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._connection is not None
        await self._connection.close()

    def _confirm(self) -> asyncio.Future[Any]:
        raw = self._raw
        raw.delivery_tag += 1
        confirm = self._loop.create_future()
        raw.confirmations[raw.delivery_tag] = confirm
        return confirm

    async def publish(self, routing_key: str, body: bytes) -> asyncio.Future[Any]:
        """Write one message now (waiting only if the connection's frame queue is full)."""
        confirm = self._confirm()
        frames = _frames(self._raw.number, self._exchange, routing_key.encode(), body, self._ctype)
        await self._raw.write_queue.put(ChannelFrame(payload=frames, should_close=False, drain_future=None))
        return confirm

    async def write_block(self, messages: Sequence[tuple[str, bytes]]) -> list[asyncio.Future[Any]]:
        confirms = []
        block = []
        for key, body in messages:
            confirms.append(self._confirm())
            block.append(_frames(self._raw.number, self._exchange, key.encode(), body, self._ctype))
        drained = self._loop.create_future()
        await self._raw.write_queue.put(ChannelFrame(payload=b"".join(block), should_close=False, drain_future=drained))
        await drained
        return confirms


async def publish_backlog(
    settings: Settings,
    messages: Iterable[tuple[str, bytes]],
    *,
    expect_in_queue: int | None = None,
    content_type: str = wire.CONTENT_TYPE,
    per_write: int = 500,
    in_flight: int = 5_000,
) -> float:
    """Publish (routing key, body) pairs, persistent, to the settings' exchange as fast as the
    broker confirms them; returns the seconds it took (until ``expect_in_queue`` messages are
    ready in the queue, when given).

    Written in blocks of ``per_write`` messages, at most ``in_flight`` unconfirmed: ~16,000-35,000
    messages/s on 2 cores, where aio-pika's ``publish`` gives ~7,000/s (the memory benchmark's
    1,000,000 take about a minute).  Confirms are required: without them a quorum queue was seen
    to drop a few messages of a fast burst whose channel closed at once."""
    started = time.perf_counter()
    async with RawPublisher(settings, content_type) as publisher:
        pending: list[list[asyncio.Future[Any]]] = []
        outstanding = 0
        block: list[tuple[str, bytes]] = []

        async def write() -> None:
            nonlocal block, outstanding
            confirms = await publisher.write_block(block)
            block = []
            pending.append(confirms)
            outstanding += len(confirms)
            while outstanding > in_flight:
                oldest = pending.pop(0)
                await asyncio.gather(*oldest)  # DeliveryError on a nack
                outstanding -= len(oldest)

        for pair in messages:
            block.append(pair)
            if len(block) >= per_write:
                await write()
        if block:
            await write()
        for confirms in pending:
            await asyncio.gather(*confirms)
        if expect_in_queue is not None:
            assert publisher._connection is not None
            await wait_ready_messages(publisher._connection, settings.queue, expect_in_queue)
    return time.perf_counter() - started


async def wait_ready_messages(
    connection: aio_pika.abc.AbstractConnection, queue: str, count: int, timeout_s: float = 600
) -> None:
    deadline = time.monotonic() + timeout_s
    channel = await connection.channel()
    try:
        while True:
            depth = await queue_depth_on(channel, queue)
            if depth >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {queue} holds {depth} of {count} messages after {timeout_s} s")
            await asyncio.sleep(0.05)
    finally:
        await channel.close()


async def queue_depth_on(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def queue_depth(settings: Settings, queue: str | None = None) -> int:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        return await queue_depth_on(channel, queue or settings.queue)


async def declare(settings: Settings) -> None:
    """The service's own topology (exchange, queue of its type, DLQ, bindings), declared by it."""
    from indexer.ingest.topology import declare_topology

    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel, settings)


async def purge(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_purge(settings.queue)


# --------------------------------------------------------------------------- Postgres


def table_digest(url: str, schema: str) -> tuple[int, str]:
    """Row count and an md5 of the read model's visible content, to compare two runs' tables."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), coalesce(md5(string_agg("
                "  concat_ws(',', mention_id, organization_id, mention_date, deleted, encode(version, 'hex')),"
                "  ';' ORDER BY mention_id)), '') FROM {}"
            ).format(sql.Identifier(schema, "mentions"))
        ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


# --------------------------------------------------------------------------- processes


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a live process: the peak resident set size the kernel recorded, in MB."""
    return _status_kb(pid, "VmHWM") / 1024


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def _status_kb(pid: int, field_name: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return float(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/{pid}/status")


def cli_environment(s: Settings, **extra: str) -> dict[str, str]:
    """The environment a ``mention-indexer`` subprocess gets for settings ``s``."""
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": s.database_url,
            "REDIS_URL": s.redis_url,
            "AMQP_URL": s.amqp_url,
            "INDEXER_SCHEMA": s.schema_name,
            "INDEXER_EXCHANGE": s.exchange,
            "INDEXER_QUEUE": s.queue,
            "INDEXER_CACHE_PREFIX": s.cache_prefix,
            "INDEXER_HTTP_PORT": str(s.http_port),
            "INDEXER_QUEUE_TYPE": s.queue_type,
            "INDEXER_BATCH_MESSAGES": str(s.batch_messages),
            "INDEXER_BATCH_WAIT_MS": str(s.batch_wait_ms),
            "INDEXER_PREFETCH": str(s.prefetch),
            "INDEXER_LOG_SUMMARY_S": str(s.log_summary_s),
            "INDEXER_LOG_FORMAT": "text",
            "INDEXER_LOG_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
        }
    )
    env.pop("INDEXER_BATCH_SIZE", None)
    env.update(extra)
    return env


class Indexer:
    """``python -m indexer run`` as a subprocess for settings ``s``, its log in a temp file."""

    def __init__(self, s: Settings, **env: str) -> None:
        import subprocess
        import tempfile

        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="bench-indexer-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "indexer", "run"], cwd=REPO,
            env=cli_environment(s, INDEXER_HTTP_PORT=str(self.port), **env),
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.pid = self.process.pid

    def tail(self) -> str:
        with open(self.log.name, errors="replace") as log_file:
            return log_file.read()[-2000:]

    def wait_ready(self, timeout_s: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the indexer exited {self.process.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the indexer did not become ready in {timeout_s} s: {self.tail()}")

    def batch_stats(self) -> dict[str, float]:
        """Means of the indexer's own batch histograms (``/metrics``): where a batch's time goes."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        sums: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")) and not sample.labels:
                    sums[sample.name.removeprefix("mention_indexer_")] = sample.value
        batches = sums.get("batch_messages_count") or 0.0
        stats = {"batches": batches}
        if batches:
            stats["mean_messages"] = sums["batch_messages_sum"] / batches
            for stage in ("batch", "apply", "invalidation"):
                count = sums.get(f"{stage}_duration_seconds_count") or 0.0
                if count:
                    stats[f"mean_{stage}_ms"] = 1000 * sums[f"{stage}_duration_seconds_sum"] / count
        return stats

    def stop(self) -> int:
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)
        return self.process.returncode


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` is the wall time in seconds."""
    out: list[float] = []
    started = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - started)


def metric_sum(service: Any, name: str) -> float:
    """A sample of the in-process service's registry, e.g. ``apply_duration_seconds_sum``."""
    for family in service.metrics.registry.collect():
        for sample in family.samples:
            if sample.name.endswith(name):
                return float(sample.value)
    return float("nan")


# --------------------------------------------------------------------------- profiling


@contextlib.contextmanager
def profiled(path: str | None, *, rate: int = 200, pid: int | None = None) -> Iterator[None]:
    """With ``path``, sample this process (or ``pid``) with py-spy (``pip install py-spy``) while
    the block runs, write the collapsed stacks to ``path`` and print the top functions to stderr."""
    if not path:
        yield
        return
    import shutil
    import subprocess

    exe = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        info("--profile: py-spy not found (pip install py-spy); running without the profile")
        yield
        return
    spy = subprocess.Popen(
        [exe, "record", "--pid", str(pid or os.getpid()), "--rate", str(rate), "--format", "raw", "--output", path,
         "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
        if os.path.exists(path):
            print(top_of_profile(path), file=sys.stderr)
        else:
            info(f"py-spy wrote no profile: {(spy.stderr.read() if spy.stderr else b'').decode()[-500:]}")


def top_of_profile(path: str, top: int = 25) -> str:
    """Self and inclusive shares of the functions of a py-spy ``--format raw`` (collapsed) file."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with open(path) as collapsed:
        for line in collapsed:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = [_short(frame) for frame in stack.split(";") if frame]
            if not frames:
                continue
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for name in set(frames):
                inclusive[name] = inclusive.get(name, 0) + count
    lines = [f"profile {path}: {total} samples", "  self%  incl%  function"]
    for name, count in sorted(own.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}  {100 * inclusive[name] / total:5.1f}  {name}")
    lines.append("  top inclusive:")
    for name, count in sorted(inclusive.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"  {100 * own.get(name, 0) / total:5.1f}  {100 * count / total:5.1f}  {name}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``fn (path/to/module.py:123)`` → ``fn (module.py)``: lines merged per function."""
    name, _, where = frame.partition(" (")
    file_part = where.rstrip(")").rsplit(":", 1)[0]
    marker = "site-packages/"
    if marker in file_part:
        file_part = file_part.split(marker, 1)[1]
    elif "/indexer/" in file_part:
        file_part = "indexer/" + file_part.split("/indexer/", 1)[1]
    else:
        file_part = os.path.basename(file_part)
    return f"{name} ({file_part})"
