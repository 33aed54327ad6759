"""Cost of the cache paths: reader hits, and invalidating batches of organizations.

    .venv/bin/python bench/bench_cache.py [--orgs 1000] [--keys-per-org 20] [--batch 200]

Uses REDIS_URL like the service, under a scratch prefix (deleted after).  Prints figures, asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import redis

from indexer import cache
from indexer.cache import AsyncCacheReader, CacheInvalidator
from indexer.config import load_settings


async def main(orgs: int, keys_per_org: int, batch: int) -> None:
    url = load_settings().redis_url
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(url)
    fill = admin.register_script(cache.FILL_LUA)
    try:
        started = time.perf_counter()
        for org in range(orgs):
            admin.set(cache.epoch_key(prefix, org), b"1")
            pipe = admin.pipeline(transaction=False)
            keys = [cache.epoch_key(prefix, org), cache.index_key(prefix, org)]
            for n in range(keys_per_org):
                fill(keys=[*keys, cache.data_key(prefix, org, f"k{n}")], args=[b"1", b"x" * 200, 600_000], client=pipe)
            pipe.execute()
        admin.sadd(cache.registry_key(prefix), *range(orgs))
        print(f"filled {orgs * keys_per_org} keys in {time.perf_counter() - started:.2f} s")

        async with AsyncCacheReader(url, prefix) as reader:
            await reader.get_or_fill(0, "hot", lambda: b"v")
            rounds = 2000
            started = time.perf_counter()
            for _ in range(rounds):
                await reader.get_or_fill(0, "hot", lambda: b"v")
            print(f"reader hit: {(time.perf_counter() - started) / rounds * 1e6:.0f} µs")

        async with CacheInvalidator(url, prefix) as inv:
            started = time.perf_counter()
            deleted = 0
            for start in range(0, orgs, batch):
                deleted += await inv.invalidate(range(start, min(start + batch, orgs)))
            elapsed = time.perf_counter() - started
            print(
                f"invalidated {deleted} keys of {orgs} orgs in batches of {batch}: {elapsed:.2f} s, "
                f"{elapsed / -(-orgs // batch) * 1e3:.1f} ms per batch"
            )
            started = time.perf_counter()
            await inv.invalidate_all()
            print(f"invalidate_all over {orgs} registered, already empty orgs: {time.perf_counter() - started:.2f} s")
    finally:
        names = list(admin.scan_iter(match=f"{prefix}:*", count=1000))  # scratch prefix only
        for start in range(0, len(names), 1000):
            admin.delete(*names[start : start + 1000])
        admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--keys-per-org", type=int, default=20)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.orgs, args.keys_per_org, args.batch))
