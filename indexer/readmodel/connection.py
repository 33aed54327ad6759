"""Connections to Postgres and psycopg's errors by what the caller must do: the one translation
for Postgres, shared by the live path, the migrations and the backfill."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg
from psycopg.conninfo import conninfo_to_dict

from indexer.errors import ConfigError, Conflict, Unavailable
from indexer.redact import mask_url, scrub


def connection_options(connect_timeout_s: int, *, idle_in_transaction_timeout_s: int | None = None) -> dict[str, Any]:
    """libpq options shared by every connection of the indexer."""
    options: dict[str, Any] = {
        "connect_timeout": connect_timeout_s,
        "application_name": "mention-indexer",
        # A silently dropped peer surfaces as an error within ~30 s instead of a hang.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }
    if idle_in_transaction_timeout_s is not None:
        # A session orphaned mid-transaction (our side reconnected, the server never noticed)
        # would keep its row locks and block the new session for hours: let Postgres end it.
        options["options"] = f"-c idle_in_transaction_session_timeout={idle_in_transaction_timeout_s}s"
    return options


_READ_ONLY = "-c default_transaction_read_only=on"


def read_only_options(url: str, connect_timeout_s: int, *flags: str) -> dict[str, Any]:
    """``connection_options`` for a session that defaults to read-only transactions (the source;
    the audit's reads), with more ``-c`` ``flags`` after.

    libpq takes one ``options``: given here, it replaces the URL's and ``PGOPTIONS``, so theirs are
    kept in front (a later ``-c`` wins: ours)."""
    options = connection_options(connect_timeout_s)
    given = conninfo_to_dict(url).get("options")
    if given is None:
        given = os.environ.get("PGOPTIONS")
    parts = (str(given or "").strip(), str(options.get("options") or "").strip(), _READ_ONLY, *flags)
    options["options"] = " ".join(part for part in parts if part)
    return options


@contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Map psycopg errors to what the caller must do: ``Conflict`` (re-run) or ``Unavailable`` (wait).

    Anything else (a bug, a constraint violation) propagates unchanged.
    """
    try:
        yield
    except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as exc:
        raise Conflict(f"postgres aborted the transaction: {exc.sqlstate} {exc.diag.message_primary}") from exc
    except psycopg.OperationalError as exc:
        # "from None": the chained original would print the unscrubbed text in a traceback.
        raise Unavailable("postgres", url, scrub(str(exc).strip(), url)) from None


@contextmanager
def read_model_required(url: str, schema: str) -> Iterator[None]:
    """``translate_errors``, and a read model that is missing or out of date as the operator's to
    fix (``ConfigError``, exit 2)."""
    try:
        with translate_errors(url):
            yield
    except (pg.UndefinedTable, pg.UndefinedFunction, pg.InvalidSchemaName, pg.UndefinedColumn):
        raise ConfigError(
            f"the read model in schema {schema} at {mask_url(url)} is missing or out of date;"
            " run `mention-indexer migrate` first"
        ) from None


async def close_quietly(conn: psycopg.AsyncConnection[Any] | None) -> None:
    """Close ``conn`` if there is one; closing a broken connection may fail, it is gone either way."""
    if conn is not None:
        try:
            await conn.close()
        except Exception:
            pass
