"""What a Postgres error during a backfill means for the operator, by the side it came from."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg

from indexer.errors import ConfigError, IndexerError
from indexer.readmodel.connection import translate_errors
from indexer.redact import mask_url

ONLY_READS = "the source query must be a single SELECT that only reads"


@contextmanager
def source_errors(url: str) -> Iterator[None]:
    """``Unavailable``/``Conflict`` as everywhere; a query Postgres rejects, or a value it cannot
    cast, is the operator's to fix (``ConfigError``, exit 2)."""
    try:
        with translate_errors(url):
            yield
    except pg.SyntaxError as exc:
        # The source's statements are prepared (the extended protocol), which takes one statement only.
        if "multiple commands" in _message(exc):
            raise ConfigError(f"{ONLY_READS}; it contains several statements (separated by ';')") from None
        raise ConfigError(f"the source query fails at {mask_url(url)}: {_message(exc)}") from None
    except pg.ReadOnlySqlTransaction as exc:  # the source is read in read-only transactions
        raise ConfigError(f"{ONLY_READS}: {_message(exc)}") from None
    except pg.FeatureNotSupported as exc:
        # The query becomes a subquery: a data-modifying WITH (DELETE ... RETURNING) is refused there.
        if "data-modifying" in _message(exc):
            raise ConfigError(f"{ONLY_READS}; it contains INSERT, UPDATE, DELETE or MERGE: {_message(exc)}") from None
        raise ConfigError(f"the source query fails at {mask_url(url)}: {_message(exc)}") from None
    except psycopg.ProgrammingError as exc:  # SQLSTATE class 42: syntax, names, types, privileges
        raise ConfigError(f"the source query fails at {mask_url(url)}: {_message(exc)}") from None
    except (psycopg.DataError, psycopg.IntegrityError) as exc:
        raise ConfigError(f"the source query returned a value that cannot be used: {_message(exc)}") from None


@contextmanager
def target_errors(url: str, schema: str) -> Iterator[None]:
    """As ``source_errors`` for the read model; a violation on the staging table means a bad
    source row, a missing relation a read model that was never migrated."""
    try:
        with translate_errors(url):
            yield
    except (pg.UndefinedTable, pg.UndefinedFunction, pg.InvalidSchemaName, pg.UndefinedColumn):
        raise ConfigError(
            f"the read model in schema {schema} at {mask_url(url)} is missing or out of date;"
            " run `mention-indexer migrate` first"
        ) from None
    except pg.CardinalityViolation:
        raise ConfigError("the source query returns a mention_id more than once; it must be unique") from None
    except pg.CheckViolation:
        raise ConfigError(
            "the source query returned a mention that is not deleted but has no organization_id"
        ) from None
    except pg.NotNullViolation:
        raise ConfigError("the source query returned a row whose mention_id is NULL") from None
    except psycopg.DataError as exc:
        raise ConfigError(f"the source query returned a value the read model cannot take: {_message(exc)}") from None
    except psycopg.Error as exc:
        # Not the source's fault: kept apart from source_errors, which may enclose this.
        raise IndexerError(f"postgres at {mask_url(url)} refused the backfill: {exc.sqlstate} {_message(exc)}") from exc


def _message(exc: psycopg.Error) -> str:
    return exc.diag.message_primary or str(exc).strip() or type(exc).__name__
