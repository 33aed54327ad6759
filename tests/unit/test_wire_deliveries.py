"""Whatever a producer sends, the codec answers a change, a refresh, ignored, or a refusal with a
reason: never another exception, never a hang."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from indexer.changes import CacheRefresh, Change
from indexer.errors import Refused
from indexer.ingest import wire
from tests.support.deliveries import HUGE_BYTES, Delivery, deliveries, same


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(deliveries)
def test_every_delivery_is_used_ignored_or_refused_with_a_reason(delivery: Delivery) -> None:
    try:
        outcome = wire.decode(delivery.body, delivery.content_type, max_bytes=HUGE_BYTES)
    except Refused as refusal:
        assert refusal.reason and "\n" not in refusal.reason and len(refusal.reason) <= 500
        return
    assert isinstance(outcome, Change | CacheRefresh | wire.Ignored)


def test_same_compares_floats_bit_for_bit() -> None:
    assert same(float("nan"), float("nan")) and not same(0.0, -0.0) and not same(1, 1.0)
