"""What a Postgres error during a backfill means for the operator, on the read model's side (the
source's: ``indexer.readmodel.source.source_errors``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg

from indexer.errors import ConfigError, IndexerError
from indexer.readmodel.connection import read_model_required
from indexer.readmodel.source import pg_message
from indexer.redact import mask_url


@contextmanager
def staging_errors() -> Iterator[None]:
    """A violation on the staging table means a bad source row, whoever staged it."""
    try:
        yield
    except pg.CardinalityViolation:
        raise ConfigError("the source query returns a mention_id more than once; it must be unique") from None
    except pg.CheckViolation:
        raise ConfigError(
            "the source query returned a mention that is not deleted but has no organization_id"
        ) from None
    except pg.NotNullViolation:
        raise ConfigError("the source query returned a row whose mention_id is NULL") from None


@contextmanager
def target_errors(url: str, schema: str) -> Iterator[None]:
    """As ``source_errors`` for the read model; a violation on the staging table means a bad
    source row, a missing relation a read model that was never migrated."""
    try:
        with read_model_required(url, schema), staging_errors():
            yield
    except psycopg.DataError as exc:
        raise ConfigError(f"the source query returned a value the read model cannot take: {pg_message(exc)}") from None
    except psycopg.Error as exc:
        # Not the source's fault: kept apart from source_errors, which may enclose this.
        raise IndexerError(
            f"postgres at {mask_url(url)} refused the backfill: {exc.sqlstate} {pg_message(exc)}"
        ) from exc
