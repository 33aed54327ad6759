"""Whole deliveries, fuzzed, through a running indexer (tests/support/delivery_fuzz.py says what
is checked).  A few thousand cases here; ``bench/fuzz_deliveries.py`` runs 100,000 and more."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from indexer.config import Settings
from tests.support.commands import cli_env
from tests.support.deliveries import HUGE_BYTES, Delivery, deliveries
from tests.support.delivery_fuzz import Tally, one_round
from tests.support.process import Indexer, free_port

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))


@pytest.mark.timeout(300)
def test_every_delivery_is_applied_ignored_or_dead_lettered_exactly(settings_: Settings, tmp_path: Path) -> None:
    env = cli_env(settings_, INDEXER_HTTP_PORT=str(free_port()), INDEXER_MAX_MESSAGE_BYTES=str(HUGE_BYTES))
    indexer = Indexer(env, tmp_path / "indexer.log")
    indexer.start()
    tally = Tally()

    # No shrinking: a failed round leaves its deliveries behind, which would confuse the next one.
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(deliveries, min_size=10, max_size=50))
    def round_of(batch: list[Delivery]) -> None:
        asyncio.run(one_round(indexer, settings_.amqp_url, settings_.exchange, settings_.dlq, batch, tally))

    try:
        round_of()
        assert indexer.running, indexer.tail()
    finally:
        indexer.stop()
    print(f"delivery fuzz: {tally.cases} cases, {dict(tally.outcomes)}, {tally.letters_checked} letters compared")
    assert tally.cases >= EXAMPLES and tally.outcomes["dead_lettered"] > 0 and tally.outcomes["change"] > 0


@pytest.fixture
def settings_(settings: Settings) -> Settings:
    """The test's settings, with a live topology: the indexer declares it on its first start."""
    return settings
