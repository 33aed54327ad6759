"""Test helpers for the audit: run it in-process on a test's settings, break the read model or the
caches behind the indexer's back (plain SQL, plain Redis commands), and read its metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime

import psycopg
import redis
from psycopg import sql

from indexer.audit import Options, Repair, Report, audit_and_repair, audit_with
from indexer.cache import CacheInvalidator, data_key
from indexer.config import Settings
from indexer.metrics import Metrics

SETTLE_S = 0.1  # differences are read again after this long (the command waits 1 s)


def options(settings: Settings, query: str | None, *, orgs: Iterable[int] = (), settle_s: float = SETTLE_S) -> Options:
    return dataclasses.replace(Options.from_settings(settings, query, orgs), settle_s=settle_s)


async def run_audit(settings: Settings, query: str | None, **kwargs: object) -> Report:
    return await audit_with(options(settings, query, **kwargs), settings)  # type: ignore[arg-type]


async def run_repair(
    settings: Settings, query: str | None, *, dry_run: bool = False, **kwargs: object
) -> tuple[Report, Repair | None, Report | None]:
    return await audit_and_repair(options(settings, query, **kwargs), settings, dry_run=dry_run)  # type: ignore[arg-type]


def counts(report: Report) -> tuple[dict[str, int], dict[str, int]]:
    """``(read_model, cache)`` as ``--json`` prints them."""
    found = report.as_json()
    return found["read_model"], found["cache"]


def model_sql(settings: Settings, statement: str, params: tuple[object, ...] = ()) -> None:
    """``statement`` on the read model, ``{mentions}`` and ``{version_bytes}`` standing for the
    test's table and its version function: a change the indexer never saw."""
    query = sql.SQL(statement).format(
        mentions=sql.Identifier(settings.schema_name, "mentions"),
        version_bytes=sql.Identifier(settings.schema_name, "version_bytes"),
    )
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(query, params)


def add_only_to_the_model(settings: Settings, mention_id: int, org: int, date: datetime, version_at: datetime) -> None:
    """A live row the source never had, with a version as a change would give it."""
    model_sql(
        settings,
        "INSERT INTO {mentions} (mention_id, organization_id, mention_date, transaction_timestamp, change_kind,"
        " deleted, version, organization_version, mention_date_version)"
        " SELECT %(id)s, %(org)s, %(date)s, %(ts)s, 1, false, v, v, v"
        " FROM {version_bytes}(%(ts)s, 1::smallint, %(org)s, %(date)s) AS v",
        {"id": mention_id, "org": org, "date": date, "ts": version_at},  # type: ignore[arg-type]
    )


async def restore_after_invalidation(settings: Settings, admin: redis.Redis, org: int, key: str) -> str:
    """What a failover back to a stale replica does to one entry: the entry as it was (DUMP), its
    organization invalidated, then the entry back (RESTORE, with its TTL).  The epoch key survives.
    Returns the entry's full name."""
    name = data_key(settings.cache_prefix, org, key)
    dumped = admin.dump(name)
    assert dumped is not None, f"{name} is not cached"
    ttl_ms = max(0, int(admin.pttl(name)))
    async with CacheInvalidator(settings.redis_url, settings.cache_prefix, track_direct_keys="off") as invalidator:
        assert await invalidator.invalidate([org]) >= 1
    assert not admin.exists(name)
    admin.restore(name, ttl_ms, dumped)
    return name


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
