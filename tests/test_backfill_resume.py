"""kill -9 in the middle of a backfill, then ``--resume``: the same table as an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess

import psycopg
import pytest
from psycopg import sql

from indexer.config import Settings
from tests.support.backfill import SourceRow, SourceTable, checkpoints, run_backfill
from tests.support.clock import at
from tests.support.commands import cli_env
from tests.support.process import spawn
from tests.support.store import read_table
from tests.support.waiting import eventually_sync

ROWS = 50_000
BATCH = 200


def backfill_process(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return spawn(cli_env(settings), "backfill", "--batch-size", str(BATCH), *args,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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
    # Explicit versions, so that two runs give identical tables, timestamps included.
    source.insert(SourceRow(i, i % 97 + 1, at(i), at(10 * i), removed=i % 13 == 0) for i in range(1, ROWS + 1))
    query = source.query(versions=True, deleted=True)
    await run_backfill(settings, query, batch_size=BATCH)
    uninterrupted = read_table(settings.database_url, settings.schema_name)
    assert len(uninterrupted) == ROWS
    reset(settings)

    process = backfill_process(settings, "--source-query", query)

    def checkpointed() -> bool:
        if committed_position(settings)[0] is not None:
            return True
        assert process.poll() is None, process.communicate()
        return False

    eventually_sync(checkpointed, timeout_s=60, interval_s=0.005, what="a checkpoint")
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
