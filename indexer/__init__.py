"""mention-indexer: mention change events → Postgres read model → per-organization Redis cache invalidation."""

__version__ = "0.1.0"
