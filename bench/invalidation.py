"""Cost of invalidating organizations' caches: with 0 vs 1,000,000 unrelated keys in Redis, and
against the number of organizations per batch.

    .venv/bin/python bench/invalidation.py [--json] [--size small|full] [--unrelated 1000000]
                                           [--keys-per-org 5] [--sizes 1,10,100,1000]

``CacheInvalidator.invalidate`` (what the service calls after each commit: the key tracker's
barrier, then one script per organization, pipelined) is timed on batches of 1, 10, 100 and 1,000
organizations, each organization holding ``--keys-per-org`` keys filled through the reader helper
just before (not timed).  First with no unrelated keys, then after ``--unrelated`` keys outside the
cache prefix were written (MSET, scratch names, deleted at the end) and the invalidator started
again (its key tracker's one SCAN per start is printed apart: it is not per invalidation).

Figures, per batch size: the median cost with the unrelated keys ≤ 1.2 × without (flat); and
the cost per organization of the largest batch ≤ that of a single organization (linear or better).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

import redis
import redis.asyncio

from _common import Report, Scratch, info, parser, quiet_logging, settings_for, sized, tag
from indexer.cache import AsyncCacheReader, CacheInvalidator

ROUNDS = {1: 300, 10: 100, 100: 30, 1000: 10}
SMALL_ROUNDS = {1: 20, 10: 10, 100: 5, 1000: 2}


async def fill(reader: AsyncCacheReader, orgs: list[int], keys_per_org: int) -> None:
    jobs = [(org, f"k{n}") for org in orgs for n in range(keys_per_org)]
    for start in range(0, len(jobs), 8):  # the helper's pool is bounded
        await asyncio.gather(*(reader.get_or_fill(org, key, lambda: b"x" * 100) for org, key in jobs[start : start + 8]))


async def measure(url: str, prefix: str, sizes: list[int], rounds: dict[int, int], keys_per_org: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with CacheInvalidator(url, prefix) as invalidator, AsyncCacheReader(url, prefix) as reader:
        started = time.perf_counter()
        await invalidator.start()
        out["start_seconds"] = time.perf_counter() - started
        for size in sizes:
            costs: list[float] = []
            deleted = 0
            for r in range(rounds.get(size, 5)):
                orgs = [(r * size + n) % 100_000 + 1 for n in range(size)]
                await fill(reader, orgs, keys_per_org)
                t = time.perf_counter()
                deleted += await invalidator.invalidate(orgs)
                costs.append(time.perf_counter() - t)
            median = statistics.median(costs)
            out[str(size)] = {
                "rounds": len(costs),
                "median_ms": median * 1000,
                "p90_ms": sorted(costs)[int(0.9 * (len(costs) - 1))] * 1000,
                "per_org_us": median / size * 1e6,
                "keys_deleted": deleted,
            }
            info(f"  {size:>5} orgs: median {median * 1000:.2f} ms ({median / size * 1e6:.0f} µs per org)")
    return out


def write_unrelated(url: str, prefix: str, count: int) -> list[str]:
    client = redis.Redis.from_url(url)
    names = [f"{prefix}:{n}" for n in range(count)]
    try:
        pipe = client.pipeline(transaction=False)
        for start in range(0, count, 1000):
            chunk = names[start : start + 1000]
            pipe.mset({name: b"v" for name in chunk})
            if (start // 1000) % 50 == 49:
                pipe.execute()
        pipe.execute()
    finally:
        client.close()
    return names


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--unrelated", type=int, help="unrelated keys (default 1,000,000; small: 20,000)")
    p.add_argument("--keys-per-org", type=int, help="keys filled per organization (default 5)")
    p.add_argument("--sizes", help="organizations per batch, comma-separated (default 1,10,100,1000; small: 1,10,100)")
    args = p.parse_args()
    quiet_logging()
    unrelated = sized(args, "unrelated", 1_000_000, 20_000)
    keys_per_org = sized(args, "keys_per_org", 5, 3)
    sizes = [int(x) for x in sized(args, "sizes", "1,10,100,1000", "1,10,100").split(",")]
    rounds = SMALL_ROUNDS if args.size == "small" else ROUNDS
    name = tag("invalidation")
    settings = settings_for(name)
    prefix, other = settings.cache_prefix, f"{name}-unrelated"
    report = Report("invalidation", "bench/invalidation.py " + " ".join(sys.argv[1:]))
    report.params.update(unrelated=unrelated, keys_per_org=keys_per_org, sizes=sizes,
                         rounds={s: rounds.get(s, 5) for s in sizes})
    with Scratch(settings) as scratch:
        scratch.prefixes.append(prefix)
        dbsize = redis.Redis.from_url(settings.redis_url).dbsize()
        info(f"without unrelated keys (the server holds {dbsize:,} keys)")
        without = asyncio.run(measure(settings.redis_url, prefix, sizes, rounds, keys_per_org))
        info(f"writing {unrelated:,} unrelated keys")
        t = time.perf_counter()
        scratch.keys.append(write_unrelated(settings.redis_url, other, unrelated))
        info(f"written in {time.perf_counter() - t:.1f} s; with them")
        with_keys = asyncio.run(measure(settings.redis_url, prefix, sizes, rounds, keys_per_org))
    report.measurements.update({"without_unrelated": without, "with_unrelated": with_keys, "server_keys_before": dbsize})
    report.note(
        f"invalidator start (key tracker's one SCAN): {without['start_seconds'] * 1000:.0f} ms without,"
        f" {with_keys['start_seconds'] * 1000:.0f} ms with {unrelated:,} unrelated keys (once per start, not per batch)"
    )
    for size in sizes:
        a, b = without[str(size)], with_keys[str(size)]
        report.note(
            f"{size:>5} orgs per batch: {a['median_ms']:.2f} ms → {b['median_ms']:.2f} ms"
            f" ({a['per_org_us']:.0f} → {b['per_org_us']:.0f} µs per org)"
        )
        report.figure(
            f"invalidate_{size}_orgs_with_{unrelated}_unrelated", b["median_ms"], "ms", 1.2 * a["median_ms"], "<=",
            f"1.2 × the same batch without unrelated keys, {a['median_ms']:.2f} ms",
        )
    largest, smallest = str(max(sizes)), str(min(sizes))
    for label, data in (("without", without), ("with", with_keys)):
        report.figure(
            f"per_org_cost_at_{largest}_orgs_{label}_unrelated", data[largest]["per_org_us"], "µs", data[smallest]["per_org_us"],
            "<=", f"the per-organization cost of a batch of {smallest}",
        )
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
