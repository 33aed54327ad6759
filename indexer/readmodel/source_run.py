"""What a run over the source (the backfill, the audit) is given in common: what it reads, the read
model's schema, and how long it waits between attempts while a service is away."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceRun:
    source_url: str
    schema: str
    """The read model's schema."""
    query: str | None = None
    """None: the default source, ``public.mentions``."""
    organizations: tuple[int, ...] = ()
    """The scope; empty: every organization."""
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
