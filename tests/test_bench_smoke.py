"""Each benchmark of bench/ runs once at its small size and prints its JSON document.

Never about speed: a benchmark that runs, cleans up after itself and reports every figure with a
limit and a ratio passes, however slow.  ~25 s for the five on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import ServiceUrls

BENCH = Path(__file__).resolve().parents[1] / "bench"

# benchmark -> figures every run must report (the figures)
EXPECTED = {
    "drain": {"drain_rate_vs_raw", "drain_rate_vs_naive"},
    "latency": {
        "publish_to_committed_p50",
        "publish_to_committed_p99",
        "publish_to_committed_max",
        "publish_to_invalidated_p50",
        "publish_to_invalidated_p99",
        "publish_to_invalidated_max",
    },
    "backfill": {
        f"backfill_{phase}_{mode}" for phase in ("empty", "rerun", "newer") for mode in ("same_db", "second_db")
    },
    "memory": {"peak_rss"},
    # small: 20,000 unrelated keys, batches of 1, 10 and 100 organizations
    "invalidation": {
        *(f"invalidate_{size}_orgs_with_20000_unrelated" for size in (1, 10, 100)),
        "per_org_cost_at_100_orgs_without_unrelated",
        "per_org_cost_at_100_orgs_with_unrelated",
    },
}


@pytest.mark.parametrize("benchmark", sorted(EXPECTED))
def test_benchmark_runs_at_small_size(benchmark: str, services: ServiceUrls) -> None:
    env = dict(
        os.environ,
        DATABASE_URL=services.database_url,
        REDIS_URL=services.redis_url,
        AMQP_URL=services.amqp_url,
    )
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{benchmark}.py"), "--json", "--size", "small"],
        capture_output=True,
        text=True,
        env=env,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)
    assert document["benchmark"] == benchmark
    assert {"command", "date", "host", "params", "figures", "measurements", "notes"} <= document.keys()
    figures = {figure["name"]: figure for figure in document["figures"]}
    assert EXPECTED[benchmark] <= figures.keys(), sorted(figures)
    for figure in figures.values():
        assert {"value", "unit", "limit", "op", "how", "ratio", "ok"} <= figure.keys()
        assert isinstance(figure["value"], int | float)
        if figure["limit"] is not None:  # a figure with a limit always has its ratio
            assert figure["op"] in (">=", "<=")
            assert isinstance(figure["ratio"], int | float)
            assert isinstance(figure["ok"], bool)
    assert "cleanup of" not in done.stderr, done.stderr[-3000:]  # every scratch thing was removed
