"""Prometheus metrics, in a registry of their own so several services can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "indexer_messages",
            "Messages handled, by outcome (applied, skipped, ignored, dead_lettered, refresh)",
            ["outcome"],
            registry=self.registry,
        )
        self.batches = Counter("indexer_batches", "Batches committed and acknowledged", registry=self.registry)
        self.batch_seconds = Histogram(
            "indexer_batch_seconds",
            "Time from a batch's first delivery to its acknowledgement",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.retries = Counter(
            "indexer_retries", "Transient failures retried, by service", ["service"], registry=self.registry
        )
        self.invalidated_orgs = Counter(
            "indexer_invalidated_organizations", "Organization caches invalidated", registry=self.registry
        )
        self.ready = Gauge("indexer_ready", "1 while /readyz answers 200", registry=self.registry)
