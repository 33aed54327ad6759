"""Throughput of ``mention-indexer backfill``: N source rows (generate_series) into an empty read
model, then the same again (every row unchanged), in scratch schemas dropped afterwards.

    .venv/bin/python bench/bench_backfill.py [--rows 500000] [--batch-size 10000] [--snapshot-versions]

Uses DATABASE_URL as source and target.  Cache invalidation is a no-op here (its cost is per
organization and chunk, not per row).  Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import uuid
from collections.abc import Iterable

import psycopg
from psycopg import sql

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
    async def invalidate(self, orgs: Iterable[int]) -> int:
        return 0


async def run(url: str, schema: str, query: str, batch_size: int) -> None:
    options = Options(source_url=url, target_url=url, schema=schema, query=query, batch_size=batch_size)
    for label in ("into an empty read model", "again, every row unchanged"):
        report = await backfill(options, NoInvalidation(), progress_stream=io.StringIO())
        print(f"{label}: {report.summary()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--snapshot-versions", action="store_true", help="source without a transaction_timestamp column")
    args = parser.parse_args()
    url = load_settings().database_url
    scratch = f"bench_{uuid.uuid4().hex[:8]}"
    source, target = sql.Identifier(scratch + "_src"), scratch
    table = sql.Identifier(scratch + "_src", "posts")
    version = "" if args.snapshot_versions else ", version_at AS transaction_timestamp"
    query = f"SELECT id AS mention_id, org AS organization_id, happened_at AS mention_date{version} FROM {scratch}_src.posts"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(source))
            conn.execute(sql.SQL(_SOURCE).format(table=table, rows=sql.Literal(args.rows)))
        print(f"{args.rows:,} source rows, batch size {args.batch_size:,}, "
              f"{'snapshot' if args.snapshot_versions else 'explicit'} versions")
        asyncio.run(run(url, target, query, args.batch_size))
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for schema in (source, sql.Identifier(target)):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(schema))


if __name__ == "__main__":
    main()
