"""The commands (emit, refresh-cache, backfill, dlq) and their exit status, and what the producers
publish, seen from outside."""

from __future__ import annotations

import re
import socket
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg import sql

from tests.blackbox import pb
from tests.blackbox.harness import MASKED_PASSWORD, BlackBox
from tests.support.process import spawn
from tests.support.waiting import eventually_sync

UTC = timezone.utc
RFC1123Z = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                      r"\d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}$")


def _check_core(core: object, org: str) -> None:
    event_id = uuid.UUID(core.id)  # type: ignore[attr-defined]
    assert event_id.version == 4 and str(event_id) == core.id, core  # type: ignore[attr-defined]
    assert RFC1123Z.match(core.timestamp), core.timestamp  # type: ignore[attr-defined]
    stamp = datetime.strptime(core.timestamp, "%a, %d %b %Y %H:%M:%S %z")  # type: ignore[attr-defined]
    assert abs(stamp - datetime.now(UTC)) < timedelta(minutes=2), core.timestamp  # type: ignore[attr-defined]
    assert core.service_name == socket.gethostname(), core  # type: ignore[attr-defined]
    assert core.application_id == "system", core  # type: ignore[attr-defined]
    assert core.organization_id == org, core  # type: ignore[attr-defined]


def test_emit_and_refresh_cache_publish_what_the_seed_describes(bb: BlackBox) -> None:
    bb.indexer()
    tap = bb.tap()
    decoder = pb.decoder()
    result = bb.cli("emit", "inserted", "--mention-id", "9007199254740993", "--org", "42",
                    "--mention-date", "Mon, 02 Jan 2006 10:00:00 UTC",
                    "--transaction-timestamp", "2006-01-02T15:04:05.250Z")
    assert result.code == 0, result
    method, props, body = bb.get(tap)
    assert method.routing_key == "events.MentionInserted"
    assert props.content_type in (None, "application/x-protobuf", "application/octet-stream"), props
    event, message = decoder.event(body)
    assert event.data.type_url == "type.googleapis.com/events.MentionInserted"
    _check_core(event.core, "42")
    assert message.payload.mention_id == 9007199254740993 and message.payload.organization_id == 42
    bb.wait_row(9007199254740993)
    assert bb.row(9007199254740993) == (42, datetime(2006, 1, 2, 10, tzinfo=UTC),
                                        datetime(2006, 1, 2, 15, 4, 5, 250000, tzinfo=UTC), False)
    for kind, name in (("updated", "MentionUpdated"), ("deleted", "MentionDeleted")):
        result = bb.cli("emit", kind, "--mention-id", "9007199254740993", "--org", "43")
        assert result.code == 0, result
        method, _, body = bb.get(tap)
        assert method.routing_key == f"events.{name}"
        event, _ = decoder.event(body)
        assert event.data.type_url == f"type.googleapis.com/events.{name}"
    bb.wait_row(9007199254740993, lambda r: r[3] is True)
    assert bb.row(9007199254740993)[0] == 43

    for args, org in ((("--org", "42"), "42"), ((), "")):
        result = bb.cli("refresh-cache", *args)
        assert result.code == 0, result
        method, props, body = bb.get(tap)
        assert method.routing_key == "events.TriggerCacheRefresh"
        event, _ = decoder.event(body)
        assert event.data.type_url == "type.googleapis.com/events.TriggerCacheRefresh"
        _check_core(event.core, org)


def test_producers_fail_unless_the_broker_took_the_message(bb: BlackBox) -> None:
    # no exchange yet (no indexer ran): nothing can take it
    result = bb.cli("emit", "inserted", "--mention-id", "1", "--org", "1")
    assert result.code == 1, result
    assert bb.exchange in result.err, result
    result = bb.cli("refresh-cache")
    assert result.code == 1, result
    # an unreachable broker: exit 1 naming the service and its URL, password masked
    for how in ("env", "flag"):
        url = "amqp://guest:s3cr3t-pw@127.0.0.1:1/"
        if how == "env":
            result = bb.cli("refresh-cache", "--org", "42", AMQP_URL=url)
        else:
            result = bb.cli("refresh-cache", "--org", "42", "--amqp-url", url)
        assert result.code == 1, result
        text = result.out + result.err
        assert "s3cr3t-pw" not in text, result
        assert "127.0.0.1:1" in text and MASKED_PASSWORD.search(text), result
        assert "rabbitmq" in text.lower() or "amqp" in text.lower(), result


def test_emit_refuses_bad_input_with_exit_2(bb: BlackBox) -> None:
    for args in (
        ("emit", "inserted", "--mention-id", "1", "--org", "1", "--transaction-timestamp", "yesterday"),
        ("emit", "inserted", "--mention-id", "x", "--org", "1"),
        ("emit", "inserted", "--org", "1"),
        ("emit", "moved", "--mention-id", "1", "--org", "1"),
    ):
        result = bb.cli(*args)
        assert result.code == 2, (args, result)
        assert result.err.strip(), (args, result)


def _source(bb: BlackBox, rows: list[tuple[int, int, datetime | None, datetime | None, bool]]) -> str:
    schema = f"{bb.unique}_src"
    bb.extra_schemas.append(schema)
    with psycopg.connect(bb.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.posts (id bigint primary key, org bigint not null, posted_at timestamptz, "
                             "modified_at timestamptz, removed boolean not null default false)").format(sql.Identifier(schema)))
        with conn.cursor() as cur:
            cur.executemany(sql.SQL("INSERT INTO {}.posts VALUES (%s, %s, %s, %s, %s)").format(sql.Identifier(schema)), rows)
    return schema


def test_backfill_from_a_source_query_obeys_the_ordering_rule_and_invalidates(bb: BlackBox) -> None:
    t = datetime(2020, 1, 1, tzinfo=UTC)
    schema = _source(bb, [
        (1, 7, t, t, False),
        (2, 7, t, t, True),                              # a tombstone in the source
        (3, 7, None, t, False),
        (4, 8, t, t, False),                             # another organization
        (5, 7, t, t, False),                             # the live stream deletes it later (2030)
        (6, 7, t + timedelta(days=1), t, False),         # the live stream inserted it earlier (2010)
    ])
    q_full = (f"SELECT id AS mention_id, org AS organization_id, posted_at AS mention_date, "
              f"modified_at AS transaction_timestamp, removed AS deleted FROM {schema}.posts")
    q_plain = f"SELECT id AS mention_id, org AS organization_id, posted_at AS mention_date FROM {schema}.posts"
    bb.indexer()
    bb.publish(pb.mention_event("Deleted", 5, 7, "2030-01-01T00:00:00Z"))
    bb.publish(pb.mention_event("Inserted", 6, 7, "2010-01-01T00:00:00Z"))
    bb.wait_acked()
    k7, k8 = bb.org_key(7), bb.org_key(8)
    bb.redis.set(k7, "v")
    bb.redis.set(k8, "v")
    result = bb.cli("backfill", "--source-query", q_full, "--org", "7", "--batch-size", "2")
    assert result.code == 0, result
    assert result.out.strip(), "backfill printed no summary"
    rows = bb.rows()
    assert rows[1] == (7, t, t, False), rows
    assert rows[2] == (7, t, t, True), rows[2]
    assert rows[3] == (7, None, t, False), rows[3]
    assert 4 not in rows, "--org 7 loaded a row of organization 8"
    assert rows[5][2:] == (datetime(2030, 1, 1, tzinfo=UTC), True), "backfill regressed a newer live delete"
    assert rows[6] == (7, t + timedelta(days=1), t, False), "backfill did not supersede an older live insert"
    assert not bb.redis.exists(k7), "backfill did not invalidate the organization it changed"
    # without a transaction_timestamp column, the version is the snapshot time (about now)
    before = datetime.now(UTC)
    result = bb.cli("backfill", "--source-query", q_plain, "--org", "8")
    assert result.code == 0, result
    org, mention_date, tx, deleted = bb.row(4)
    assert (org, mention_date, deleted) == (8, t, False)
    assert before - timedelta(seconds=5) <= tx <= datetime.now(UTC) + timedelta(seconds=5), tx
    # --prune tombstones what the source no longer has, within the scope
    bb.sql(sql.SQL("DELETE FROM {}.posts WHERE id = 1").format(sql.Identifier(schema)))
    result = bb.cli("backfill", "--source-query", q_full, "--org", "7", "--prune")
    assert result.code == 0, result
    assert bb.row(1)[3] is True, bb.row(1)
    assert bb.row(4)[3] is False, "--prune --org 7 touched organization 8"


def test_backfill_default_source_is_public_mentions_of_source_database_url(bb: BlackBox) -> None:
    database = f"{bb.unique}_src"
    bb.extra_databases.append(database)
    bb.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    parts = bb.database_url.rsplit("/", 1)
    source_url = f"{parts[0]}/{database}"
    with psycopg.connect(source_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.mentions (mention_id bigint primary key, organization_id bigint, "
                     "mention_date timestamptz, other text)")
        conn.execute("INSERT INTO public.mentions VALUES (1, 5, '2021-01-01T00:00:00Z', 'x'), (2, 6, NULL, 'y')")
    # SOURCE_DATABASE_URL: unreachable, password masked, exit 1
    bad = "postgresql://postgres:pg-s3cr3t@127.0.0.1:1/postgres"
    result = bb.cli("backfill", SOURCE_DATABASE_URL=bad)
    assert result.code == 1, result
    assert "pg-s3cr3t" not in result.out + result.err, result
    assert "127.0.0.1:1" in result.err, result
    # the flag overrides the variable
    result = bb.cli("backfill", "--source-database-url", source_url, SOURCE_DATABASE_URL=bad)
    assert result.code == 0, result
    # and the variable alone
    result = bb.cli("backfill", SOURCE_DATABASE_URL=source_url)
    assert result.code == 0, result
    rows = bb.rows()
    assert {k: (v[0], v[1], v[3]) for k, v in rows.items()} == {
        1: (5, datetime(2021, 1, 1, tzinfo=UTC), False), 2: (6, None, False)}, rows


def test_backfill_shows_progress_on_a_terminal(bb: BlackBox) -> None:
    import os
    import pty
    import select

    master, slave = pty.openpty()
    query = ("SELECT g AS mention_id, 1 AS organization_id, NULL::timestamptz AS mention_date "
             "FROM generate_series(1, 60000) g")
    proc = spawn(bb.env(), "backfill", "--source-query", query, "--batch-size", "3000",
                 stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(30) == 0, out
    text = out.decode(errors="replace")
    assert "60000" in text.replace(",", "") and ("%" in text or "/" in text), text[-2000:]
    assert len(bb.rows()) == 60000


def test_backfill_bad_usage_exits_2(bb: BlackBox) -> None:
    schema = _source(bb, [])
    for args in (
        ("--source-query", f"SELECT id AS mention_id FROM {schema}.posts"),
        ("--org", "abc"),
        ("--batch-size", "0"),
    ):
        result = bb.cli("backfill", *args)
        assert result.code == 2, (args, result)
        assert result.err.strip(), (args, result)


def test_dlq_list_and_replay(bb: BlackBox) -> None:
    result = bb.cli("dlq", "list")
    assert result.code == 1, f"dlq list without a DLQ should fail at run time: {result}"
    proc = bb.indexer(INDEXER_MAX_MESSAGE_BYTES="1024")
    bodies = {i: pb.mention_event("Inserted", i, 42, "2020-01-01T00:00:00Z", baggage={"pad": "x" * 1500})
              for i in (1, 2)}
    for i, body in bodies.items():
        bb.publish(body, message_id=f"m{i}", headers={"x-test": f"h{i}"}, app_id="blackbox")
    eventually_sync(lambda: bb.queue_depth(bb.dlq) == 2, what="two dead letters")
    result = bb.cli("dlq", "list")
    assert result.code == 0, result
    assert re.search(r"\b2\b", result.out), result
    assert bb.queue_depth(bb.dlq) == 2, "dlq list removed letters"
    proc.stop()
    bb.indexer()  # the fix: the default size limit
    tap = bb.tap()
    result = bb.cli("dlq", "replay")
    assert result.code == 0, result
    bb.wait_row(1)
    bb.wait_row(2)
    assert bb.queue_depth(bb.dlq) == 0
    replayed = {}
    for _ in range(2):
        method, props, body = bb.get(tap)
        replayed[props.message_id] = (method.routing_key, props, body)
    for i, body in bodies.items():
        routing_key, props, got = replayed[f"m{i}"]
        assert (routing_key, got, props.app_id) == ("events.MentionInserted", body, "blackbox"), props
        assert props.content_type == "application/x-protobuf" and (props.headers or {}).get("x-test") == f"h{i}", props
