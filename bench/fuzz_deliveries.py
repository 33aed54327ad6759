"""A long fuzz run of whole deliveries through a real indexer (``run`` as a subprocess): random
properties, header tables of every AMQP type, hostile bodies; every delivery must be applied,
ignored or dead-lettered with a reason, the process must live, each dead letter must equal its
original.  tests/support/delivery_fuzz.py has the checks; tests/test_delivery_fuzz.py runs a few
thousand cases in CI.

    .venv/bin/python bench/fuzz_deliveries.py [--cases 100000] [--json]

Works under scratch names (schema, exchange, queues, key prefix) and removes them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.support

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from indexer.config import load_settings  # noqa: E402
from tests.conftest import _drop_amqp, _drop_keys, _drop_schema  # noqa: E402
from tests.support.commands import cli_env  # noqa: E402
from tests.support.deliveries import HUGE_BYTES, Delivery, deliveries  # noqa: E402
from tests.support.delivery_fuzz import Tally, one_round  # noqa: E402
from tests.support.process import Indexer, free_port  # noqa: E402

PER_ROUND = 50  # deliveries per round at most; hypothesis generates larger lists poorly


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="deliveries in all (default 100000)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    name = "fuzz" + uuid.uuid4().hex[:10]
    config = load_settings(
        schema_name=f"{name}_idx",
        exchange=f"{name}.events",
        queue=f"{name}.indexer",
        cache_prefix=f"{name}-mentions",
        http_port=0,
    )
    folder = Path(tempfile.mkdtemp(prefix="fuzz-deliveries-"))
    indexer = Indexer(
        cli_env(config, INDEXER_HTTP_PORT=str(free_port()), INDEXER_MAX_MESSAGE_BYTES=str(HUGE_BYTES)),
        folder / "indexer.log",
    )
    tally = Tally()
    started = time.monotonic()

    @settings(
        max_examples=100, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
    )
    @given(st.lists(deliveries, min_size=PER_ROUND // 5, max_size=PER_ROUND))
    def round_of(batch: list[Delivery]) -> None:
        if tally.cases < args.cases:
            asyncio.run(one_round(indexer, config.amqp_url, config.exchange, config.dlq, batch, tally))

    failure = None
    try:
        indexer.start()
        while tally.cases < args.cases:  # hypothesis favours short lists: run rounds until enough
            round_of()
        if not indexer.running:
            failure = "the indexer died"
    except AssertionError as exc:  # a property broke: say which, keep the log
        failure = str(exc)[:2000]
    finally:
        indexer.stop()
        _drop_schema(config.database_url, config.schema_name)
        _drop_keys(config.redis_url, config.cache_prefix)
        _drop_amqp(config.amqp_url, config.exchange, [config.queue, config.dlq])
    elapsed_s = time.monotonic() - started
    report = {
        "cases": tally.cases,
        "outcomes": dict(tally.outcomes),
        "dead_letters_compared": tally.letters_checked,
        "seconds": round(elapsed_s, 1),
        "cases_per_s": round(tally.cases / elapsed_s, 1),
        "failure": failure,
        "log": str(folder / "indexer.log"),
    }
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
