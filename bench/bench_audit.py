"""Time of ``mention-indexer audit`` over a consistent read model, next to the time of the full
backfill that built it, measured in the same run on the same rows:

    .venv/bin/python bench/bench_audit.py [--rows 1000000] [--differences 20]

1. N source rows (generate_series, with a version column) in a scratch schema;
2. a full backfill of them into an empty read model (timed);
3. the audit of the consistent model (timed): checksums of id ranges on both sides;
4. ``--differences`` rows changed behind the indexer's back, spread over the ids, and the audit
   again (timed): it descends only into the ranges that differ.

Uses DATABASE_URL as source and read model, REDIS_URL for the (empty, scratch-prefixed) caches;
everything it creates is dropped afterwards.  Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
import uuid
from collections.abc import Iterable

import psycopg
from psycopg import sql

from indexer.audit import Options as AuditOptions
from indexer.audit import audit
from indexer.cache import CacheInspector
from indexer.config import load_settings
from indexer.ops.backfill import Options, backfill

_SOURCE = """
CREATE TABLE {table} AS
SELECT g::bigint AS id, (g % 1000 + 1)::bigint AS org,
       timestamptz '2024-01-01' + g * interval '1 second' AS happened_at,
       timestamptz '2024-06-01' + g * interval '1 millisecond' AS version_at
FROM generate_series(1, {rows}) AS g;
ALTER TABLE {table} ADD PRIMARY KEY (id);
ANALYZE {table};
"""


class NoInvalidation:
    """The caches are not what is measured: invalidating costs per organization, not per row."""

    async def start(self) -> None:
        return None

    async def invalidate(self, orgs: Iterable[int]) -> int:
        return 0


async def run(url: str, redis_url: str, schema: str, query: str, rows: int, differences: int) -> None:
    started = time.perf_counter()
    report = await backfill(
        Options(source_url=url, target_url=url, schema=schema, query=query, batch_size=10_000),
        NoInvalidation(),
        progress_stream=io.StringIO(),
    )
    backfill_s = time.perf_counter() - started
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(schema, "mentions")))
    options = AuditOptions(database_url=url, schema=schema, source_url=url, query=query)
    async with CacheInspector(redis_url, f"{schema}-mentions") as inspector:
        started = time.perf_counter()
        clean = await audit(options, inspector)
        audit_s = time.perf_counter() - started
        step = max(1, rows // max(1, differences))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("UPDATE {} SET organization_id = organization_id + 1 WHERE mention_id % {} = 7").format(
                    sql.Identifier(schema, "mentions"), sql.Literal(step)
                )
            )
        started = time.perf_counter()
        found = await audit(options, inspector)
        found_s = time.perf_counter() - started
    m = clean.read_model.counts
    print(f"rows:                     {rows:,}")
    print(f"full backfill:            {backfill_s:8.2f} s   ({report.summary()})")
    print(f"audit, consistent model:  {audit_s:8.2f} s   ({m.checked:,} checked, {m.differences} differences)")
    f = found.read_model.counts
    print(
        f"audit, {f.differences} differences:   {found_s:8.2f} s   ({f.checked:,} checked; includes the"
        f" {options.settle_s:.0f} s it waits before reading differences again)"
    )
    print(f"audit / backfill:         {audit_s / backfill_s:8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--differences", type=int, default=20, help="rows changed before the second audit")
    args = parser.parse_args()
    settings = load_settings()
    url = settings.database_url
    scratch = f"bench_{uuid.uuid4().hex[:8]}"
    source = sql.Identifier(scratch + "_src")
    table = sql.Identifier(scratch + "_src", "posts")
    query = (
        "SELECT id AS mention_id, org AS organization_id, happened_at AS mention_date,"
        f" version_at AS transaction_timestamp FROM {scratch}_src.posts"
    )
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(source))
            conn.execute(sql.SQL(_SOURCE).format(table=table, rows=sql.Literal(args.rows)))
        asyncio.run(run(url, settings.redis_url, scratch, query, args.rows, args.differences))
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for schema in (source, sql.Identifier(scratch)):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(schema))


if __name__ == "__main__":
    main()
