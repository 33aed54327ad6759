"""Prometheus metrics, ``mention_indexer_*``, in a registry of their own (several services can live
in one process, as in tests).  docs/production.md says what each one means and what to alert on.

No label takes unbounded values: outcomes, reasons and dependencies are fixed sets, never an
organization or a routing key.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "mention_indexer_"
# The continuous audit (docs/audit.md): the pairs it compares and the kinds of difference of each.
AUDIT_KINDS = {"read_model": ("missing", "extra", "changed"), "cache": ("stale",)}
DEPENDENCIES = ("postgres", "redis", "rabbitmq")
OUTCOMES = ("applied", "duplicate", "stale", "ignored", "dead_lettered", "refresh", "held")
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Lag spans a healthy few milliseconds to a backlog of hours.
_LAG_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
_MESSAGES = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class Metrics:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        counter, gauge, histogram = self._counter, self._gauge, self._histogram
        self.messages = counter("messages", "Messages handled, by outcome", "outcome")
        self.dead_letters = counter("dead_letters", "Messages dead-lettered, by class of reason", "reason")
        self.lag = histogram("lag_seconds", "Acknowledgement time minus each applied change's version", _LAG_SECONDS)
        self.last_applied = gauge("last_applied_timestamp_seconds", "The highest version applied, in Unix seconds")
        self.batches = counter("batches", "Batches acknowledged")
        self.batch_messages = histogram("batch_messages", "Messages per batch", _MESSAGES)
        self.batch_duration = histogram("batch_duration_seconds", "From a batch's first delivery to its ack", _SECONDS)
        self.apply_duration = histogram("apply_duration_seconds", "Committing a batch to Postgres", _SECONDS)
        self.invalidation_duration = histogram(
            "invalidation_duration_seconds", "Invalidating a batch's organizations in Redis", _SECONDS
        )
        self.retries = counter("retries", "Transient failures retried, by dependency", "dependency")
        self.dependency_up = gauge("dependency_up", "1 while the dependency answers, else 0", "dependency")
        self.invalidated_organizations = counter("invalidated_organizations", "Organization caches invalidated")
        self.in_hand = gauge("deliveries_in_hand", "Deliveries received and not yet acknowledged")
        self.since_last_delivery = gauge("seconds_since_last_delivery", "Seconds since the last delivery arrived")
        self.consumer_registered = gauge("consumer_registered", "1 while a consumer is registered on the queue")
        self.ready = gauge("ready", "1 while /readyz answers 200")
        self._audit: AuditMetrics | None = None
        self._last_delivery_s: float | None = None
        self.since_last_delivery.set_function(self._seconds_since_last_delivery)
        for outcome in OUTCOMES:  # every series exists from the start, so rate() and alerts see 0
            self.messages.labels(outcome)
        for dependency in DEPENDENCIES:
            self.retries.labels(dependency)
            self.dependency_up.labels(dependency).set(0)

    def audit(self) -> AuditMetrics:
        """The continuous audit's metrics, registered on first use: exported only by an indexer
        that runs the audit (``INDEXER_AUDIT_INTERVAL_S``), so none stands at a misleading 0."""
        if self._audit is None:
            self._audit = AuditMetrics(self)
        return self._audit

    def _counter(self, name: str, text: str, *labels: str) -> Counter:
        return Counter(f"{PREFIX}{name}", text, labels, registry=self.registry)

    def _gauge(self, name: str, text: str, *labels: str) -> Gauge:
        return Gauge(f"{PREFIX}{name}", text, labels, registry=self.registry)

    def _histogram(self, name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"{PREFIX}{name}", text, buckets=buckets, registry=self.registry)

    def delivered(self) -> None:
        self._last_delivery_s = self._clock()

    def _seconds_since_last_delivery(self) -> float:
        return 0.0 if self._last_delivery_s is None else max(0.0, self._clock() - self._last_delivery_s)


class AuditMetrics:
    """``mention_indexer_audit_*``: what each sample of the continuous audit checked and found.

    ``checked_total{pair}`` and ``differences_total{pair,kind}`` count over time (alert on any
    increase of the latter); ``consistency_ratio{pair}`` is the share of the last sample that
    agreed (1 when all did).  Changes still in flight are counted apart, never as differences."""

    def __init__(self, metrics: Metrics) -> None:
        counter, gauge = metrics._counter, metrics._gauge
        self.checked = counter(
            "audit_checked", "Mentions and cache entries the continuous audit compared, by pair", "pair"
        )
        self.differences = counter(
            "audit_differences", "Differences the continuous audit found, by pair and kind", "pair", "kind"
        )
        self.consistency = gauge(
            "audit_consistency_ratio", "Share of the last audit sample that agreed, by pair (1: all)", "pair"
        )
        self.in_flight = counter("audit_in_flight", "Source changes the audit found not applied yet (not differences)")
        self.failures = counter("audit_failures", "Audit samples that failed (logged; tried again next interval)")
        for pair, kinds in AUDIT_KINDS.items():
            self.checked.labels(pair)
            for kind in kinds:
                self.differences.labels(pair, kind)

    def sampled(self, pair: str, checked: int, differences: dict[str, int]) -> None:
        """Record one sample of ``pair``: ``checked`` compared, ``differences`` by kind."""
        self.checked.labels(pair).inc(checked)
        for kind, count in differences.items():
            self.differences.labels(pair, kind).inc(count)
        if checked:
            self.consistency.labels(pair).set(max(0.0, 1.0 - sum(differences.values()) / checked))
