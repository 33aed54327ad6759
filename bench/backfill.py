"""Throughput of `mention-indexer backfill` beside the in-SQL merge of the same rows.

    .venv/bin/python bench/backfill.py [--json] [--size small|full] [--rows 1000000]
                                       [--batch-size N] [--profile DIR]

A source table of ``--rows`` rows (default 1,000,000; ~1,000 organizations, 2 % deleted, with
an explicit version column) is built twice, identically: in DATABASE_URL's database and in a
second, scratch database.  Three read models (scratch schemas of DATABASE_URL's database) go
through the same three phases:

* **empty**: into an empty read model;
* **rerun**: the same source again (every row unchanged);
* **newer**: after 10 % of the source rows got a newer version and a new mention date (a fifth of
  them a new organization too).

In each phase the limit is measured first: ONE ``INSERT … SELECT … ON CONFLICT … DO UPDATE …
WHERE`` statement (the read model's guard: write only what changes a visible field, versions from
the schema's ``version_bytes``) from the local source table into the first model.  Then the
command itself runs, as a subprocess (`python -m indexer backfill --source-query …`, real cache
invalidation under a scratch prefix), from the same database into the second model and from the
second database into the third.  Its time is the one it prints (without the interpreter's
start).  Figures: backfill ≥ 0.5 × the in-SQL merge, for each phase and each source.  The three
tables are compared at the end of each phase (they must be equal).

With ``--profile DIR`` each backfill runs under ``py-spy record`` (collapsed stacks in DIR) and
the top functions are printed.  Not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from _common import (
    REPO,
    Report,
    Scratch,
    cli_environment,
    info,
    parser,
    quiet_logging,
    settings_for,
    sized,
    table_digest,
    tag,
    top_of_profile,
)

from indexer.readmodel.merge import merge_statement

_SOURCE = """
CREATE SCHEMA {schema};
CREATE TABLE {table} (
    id          bigint      PRIMARY KEY,
    org         bigint      NOT NULL,
    posted_at   timestamptz,
    modified_at timestamptz NOT NULL,
    removed     boolean     NOT NULL
);
INSERT INTO {table}
SELECT g, (g * 7919) % 1000 + 1,
       timestamptz '2026-01-01' - ((g * 104729) % 2592000) * interval '1 second',
       timestamptz '2025-06-01' + g * interval '1 millisecond',
       g % 50 = 0
FROM generate_series(1::bigint, {rows}) AS g;
ANALYZE {table};
"""

# 10 % of the rows: a newer version and another date; a fifth of those another organization.
_NEWER = """
UPDATE {table}
SET modified_at = modified_at + interval '30 days',
    posted_at = posted_at + interval '1 hour',
    org = CASE WHEN id % 50 = 3 THEN (org % 1000) + 1 ELSE org END
WHERE id % 10 = 3;
ANALYZE {table};
"""

# The limit: the read model's guarded merge (the product's own statement, with the backfill's
# condition), all rows in one statement, in SQL only.  The source's rows as its incoming relation:
# a removed row is a Delete, any other an Insert, versions from the schema's version_bytes.
_INCOMING = """
(SELECT s.id AS mention_id, v.version, s.modified_at AS transaction_timestamp, k.kind AS change_kind,
        nullif(s.org, 0) AS organization_id,
        CASE WHEN nullif(s.org, 0) IS NULL THEN ''::bytea ELSE v.version END AS organization_version,
        s.posted_at AS mention_date,
        CASE WHEN s.posted_at IS NULL THEN ''::bytea ELSE v.version END AS mention_date_version
 FROM {source} AS s
 CROSS JOIN LATERAL (SELECT (CASE WHEN s.removed THEN 3 ELSE 1 END)::smallint AS kind) AS k
 CROSS JOIN LATERAL (SELECT {version_bytes}(s.modified_at, k.kind, nullif(s.org, 0), s.posted_at) AS version) AS v
) AS c
"""

_SUMMARY = re.compile(r"read (\d+), inserted (\d+), updated (\d+), unchanged (\d+), .*; ([0-9,]+) rows/s in ([0-9.]+) s")


def database_url(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def build_source(url: str, schema: str, rows: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(_SOURCE).format(
                schema=sql.Identifier(schema), table=sql.Identifier(schema, "posts"), rows=sql.Literal(rows)
            )
        )


def make_newer(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL(_NEWER).format(table=sql.Identifier(schema, "posts")))


def migrate(settings: Any, schema: str) -> None:
    env = cli_environment(settings, INDEXER_SCHEMA=schema)
    subprocess.run([sys.executable, "-m", "indexer", "migrate"], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def in_sql(url: str, schema: str, source_schema: str) -> dict[str, Any]:
    incoming = sql.SQL(_INCOMING).format(
        source=sql.Identifier(source_schema, "posts"), version_bytes=sql.Identifier(schema, "version_bytes")
    )
    merge = merge_statement(sql.Identifier(schema, "mentions"), incoming, only_changed_fields=True)
    statement = sql.SQL("WITH written AS ({}) SELECT count(*) FROM written").format(merge)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT 1")
        started = time.perf_counter()
        row = conn.execute(statement).fetchone()
        elapsed = time.perf_counter() - started
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, "mentions")))
    return {"seconds": elapsed, "written": int(row[0]) if row else 0}


def run_backfill(
    settings: Any, schema: str, source_url: str, source_schema: str, batch_size: int | None, profile: str | None
) -> dict[str, Any]:
    query = (
        "SELECT id AS mention_id, org AS organization_id, posted_at AS mention_date,"
        f" modified_at AS transaction_timestamp, removed AS deleted FROM {source_schema}.posts"
    )
    env = cli_environment(settings, INDEXER_SCHEMA=schema, SOURCE_DATABASE_URL=source_url)
    command = [sys.executable, "-m", "indexer", "backfill", "--source-query", query]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    if profile:
        spy = shutil.which("py-spy", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
        if spy is None:
            info("--profile: py-spy not found (pip install py-spy)")
        else:
            command = [spy, "record", "--rate", "200", "--format", "raw", "--output", profile, "--", *command]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"backfill exited {done.returncode}: {done.stderr[-2000:]}")
    summary = next((line for line in done.stdout.splitlines() if line.startswith("backfill")), "")
    match = _SUMMARY.search(summary)
    if match is None:
        raise RuntimeError(f"no summary line in the backfill's output: {done.stdout[-500:]}")
    read, inserted, updated, unchanged, rate, seconds = match.groups()
    # The rate is computed from its exact elapsed time (the seconds are rounded to 0.1).
    own = int(read) / float(rate.replace(",", "")) if float(rate.replace(",", "")) > 0 else float(seconds)
    out = {
        "seconds": own,
        "wall_seconds": wall,
        "read": int(read),
        "inserted": int(inserted),
        "updated": int(updated),
        "unchanged": int(unchanged),
        "summary": summary,
    }
    if profile and os.path.exists(profile):
        out["profile"] = profile
        print(top_of_profile(profile, top=20), file=sys.stderr)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, "mentions")))
    return out


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, help="source rows (default 1,000,000; small: 5,000)")
    p.add_argument("--batch-size", type=int, help="the command's --batch-size (default: its own, 10,000)")
    p.add_argument("--profile", metavar="DIR", help="py-spy each backfill run into DIR")
    args = p.parse_args()
    quiet_logging()
    rows = sized(args, "rows", 1_000_000, 5_000)
    name = tag("backfill")
    settings = settings_for(name)
    report = Report("backfill", "bench/backfill.py " + " ".join(sys.argv[1:]))
    report.params.update(rows=rows, batch_size=args.batch_size or "default (10,000)")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    source_schema = f"{name}_src"
    second_db = f"{name}_db2"
    second_url = database_url(settings.database_url, second_db)
    models = {"in_sql": f"{name}_sql", "same_db": f"{name}_same", "second_db": f"{name}_second"}
    results: dict[str, dict[str, Any]] = {}
    with Scratch(settings) as scratch:
        scratch.schemas += [source_schema, *models.values()]
        scratch.databases.append(second_db)
        scratch.prefixes.append(settings.cache_prefix)
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(second_db)))
        info(f"building {rows:,} source rows in two databases")
        build_source(settings.database_url, source_schema, rows)
        build_source(second_url, source_schema, rows)
        for schema in models.values():
            migrate(settings, schema)
        for phase in ("empty", "rerun", "newer"):
            if phase == "newer":
                make_newer(settings.database_url, source_schema)
                make_newer(second_url, source_schema)
            results[f"{phase}/in_sql"] = reference = in_sql(settings.database_url, models["in_sql"], source_schema)
            info(f"{phase}: in-SQL merge {reference['seconds']:.2f} s ({reference['written']:,} written)")
            for mode, url in (("same_db", settings.database_url), ("second_db", second_url)):
                profile = os.path.join(args.profile, f"{mode}-{phase}.txt") if args.profile else None
                if profile:
                    print(f"--- profile of the backfill, {mode}, {phase}", file=sys.stderr)
                result = run_backfill(settings, models[mode], url, source_schema, args.batch_size, profile)
                results[f"{phase}/{mode}"] = result
                info(f"{phase}: backfill from {mode} {result['seconds']:.2f} s: {result['summary']}")
                limit_rate = 0.5 * rows / reference["seconds"]
                report.figure(
                    f"backfill_{phase}_{mode}", rows / result["seconds"], "rows/s", limit_rate, ">=",
                    f"0.5 × in-SQL merge {rows / reference['seconds']:,.0f} rows/s ({reference['seconds']:.2f} s)",
                )
            digests = {mode: table_digest(settings.database_url, schema) for mode, schema in models.items()}
            equal = len(set(digests.values())) == 1
            results[f"{phase}/tables_equal"] = {"equal": equal, "rows": digests["in_sql"][0]}
            report.note(f"{phase}: the three read models are equal: {equal} ({digests['in_sql'][0]:,} rows)")
    report.measurements.update(results)
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
