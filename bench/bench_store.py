"""Throughput of ``Store.apply``: N changes in batches of B into a scratch schema (dropped after).

    .venv/bin/python bench/bench_store.py [--changes 100000] [--batch-size 500]

Uses DATABASE_URL like the service.  Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from indexer.changes import Change, Kind
from indexer.config import load_settings
from indexer.readmodel.migrate import migrate
from indexer.readmodel.store import Store

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def workload(count: int, mentions: int, rng: random.Random) -> list[Change]:
    """Mostly inserts and updates with some deletes, over ``mentions`` ids, timestamps increasing."""
    kinds = rng.choices(list(Kind), weights=[5, 4, 1], k=count)
    return [
        Change(
            kind=kind,
            mention_id=rng.randint(1, mentions),
            organization_id=rng.randint(1, 200),
            mention_date=T0 + timedelta(days=rng.randint(0, 365)),
            transaction_timestamp=T0 + timedelta(milliseconds=i),
        )
        for i, kind in enumerate(kinds)
    ]


async def run(url: str, schema: str, changes: list[Change], batch_size: int) -> None:
    # Uncoalesced, as the pipeline passes them: the store folds each batch per mention itself.
    batches = [changes[i : i + batch_size] for i in range(0, len(changes), batch_size)]
    latencies_ms: list[float] = []
    applied = skipped = 0
    async with Store(url, schema) as store:
        await store.ping()  # connect outside the measurement
        started = time.perf_counter()
        for batch in batches:
            t = time.perf_counter()
            result = await store.apply(batch)
            latencies_ms.append((time.perf_counter() - t) * 1000)
            applied += result.applied
            skipped += result.skipped
        elapsed_s = time.perf_counter() - started
    total = sum(len(b) for b in batches)
    quantiles = statistics.quantiles(latencies_ms, n=100)
    print(f"{total} changes in {len(batches)} batches of ≤{batch_size}: {elapsed_s:.2f} s, {total / elapsed_s:,.0f} changes/s")
    print(f"per batch: p50 {quantiles[49]:.1f} ms, p99 {quantiles[98]:.1f} ms; applied {applied}, skipped {skipped}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--mentions", type=int, default=50_000, help="distinct mention ids drawn from")
    args = parser.parse_args()
    url = load_settings().database_url
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    migrate(url, schema)
    try:
        asyncio.run(run(url, schema, workload(args.changes, args.mentions, random.Random(1)), args.batch_size))
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


if __name__ == "__main__":
    main()
