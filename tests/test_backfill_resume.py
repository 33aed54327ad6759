"""kill -9 in the middle of a backfill, then ``--resume``: the same table as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from indexer.config import Settings
from indexer.migrate import migrate
from tests.support.backfill import SourceRow, SourceTable, checkpoints, run_backfill, source_table
from tests.support.store import at, read_table

ROWS = 50_000
BATCH = 200


@pytest.fixture
def source(settings: Settings) -> Iterator[SourceTable]:
    migrate(settings.database_url, settings.schema_name)
    with source_table(settings) as table:
        # Explicit versions, so that two runs give identical tables, timestamps included.
        table.insert(SourceRow(i, i % 97 + 1, at(i), at(10 * i), removed=i % 13 == 0) for i in range(1, ROWS + 1))
        yield table


def backfill_process(settings: Settings, *args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "INDEXER_SCHEMA": settings.schema_name,
        "INDEXER_CACHE_PREFIX": settings.cache_prefix,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "indexer", "backfill", "--batch-size", str(BATCH), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def committed_position(settings: Settings) -> tuple[int | None, bool]:
    try:
        rows = checkpoints(settings)
    except psycopg.errors.UndefinedTable:
        return None, False
    if not rows:
        return None, False
    return rows[0]["last_mention_id"], rows[0]["completed_at"] is not None  # type: ignore[return-value]


def reset(settings: Settings) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("TRUNCATE {}, {}").format(
                sql.Identifier(settings.schema_name, "mentions"), sql.Identifier(settings.schema_name, "backfill_checkpoints")
            )
        )


@pytest.mark.slow
async def test_resume_after_kill_9_gives_the_uninterrupted_table(settings: Settings, source: SourceTable) -> None:
    query = source.query(versions=True, deleted=True)
    await run_backfill(settings, query, batch_size=BATCH)
    uninterrupted = read_table(settings.database_url, settings.schema_name)
    assert len(uninterrupted) == ROWS
    reset(settings)

    process = backfill_process(settings, "--source-query", query)
    deadline = time.monotonic() + 60
    while True:
        last, completed = committed_position(settings)
        if last is not None:
            break
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=10)  # reaps it and closes its pipes
    last, completed = committed_position(settings)
    assert last is not None and not completed and last < ROWS, "killed too late to test anything"
    assert len(read_table(settings.database_url, settings.schema_name)) < ROWS

    resumed = backfill_process(settings, "--source-query", query, "--resume")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    # It continued: it read only what the killed run had not committed.
    read = int(out.split("read ")[1].split(",")[0])
    assert read == ROWS - last
    assert read_table(settings.database_url, settings.schema_name) == uninterrupted
    assert committed_position(settings) == (ROWS, True)
