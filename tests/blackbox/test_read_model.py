"""The read model's table and the ordering rule (the highest version wins, whatever the delivery
order), observed in Postgres after publishing with pika."""

from __future__ import annotations

import itertools
import random
import subprocess
from datetime import timedelta

from psycopg import sql

from tests.blackbox import pb
from tests.blackbox.harness import BlackBox
from tests.support.clock import utc
from tests.support.process import spawn


def test_migrate_creates_the_read_model_columns_idempotently_and_concurrently(bb: BlackBox) -> None:
    env = bb.env()
    procs = [spawn(env, "migrate", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = [(p.wait(60), *p.communicate()) for p in procs]
    assert all(code == 0 for code, _, _ in outcomes), outcomes
    again = bb.cli("migrate")
    assert again.code == 0, again
    columns = {
        name: (data_type, nullable)
        for name, data_type, nullable in bb.sql(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = 'mentions'", (bb.schema,))
    }
    assert columns.get("mention_id") == ("bigint", "NO"), columns
    assert columns.get("organization_id") == ("bigint", "NO"), columns
    assert columns.get("mention_date", ("?",))[0] == "timestamp with time zone", columns
    assert columns.get("transaction_timestamp") == ("timestamp with time zone", "NO"), columns
    assert columns.get("deleted") == ("boolean", "NO"), columns
    primary_key = bb.sql(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = %s::regclass AND i.indisprimary",
        (sql.SQL("{}.mentions").format(sql.Identifier(bb.schema)).as_string(),))
    assert primary_key == [("mention_id",)], primary_key


def test_all_three_timestamp_forms_with_sub_second_precision(bb: BlackBox) -> None:
    bb.indexer()
    cases = {
        1: ("Mon, 02 Jan 2006 15:04:05 UTC", "Mon, 02 Jan 2006 10:00:00 UTC", utc(2006, 1, 2, 15, 4, 5), utc(2006, 1, 2, 10)),
        2: ("Mon, 02 Jan 2006 15:04:05 GMT", "Mon, 02 Jan 2006 10:00:00 GMT", utc(2006, 1, 2, 15, 4, 5), utc(2006, 1, 2, 10)),
        3: ("Mon, 02 Jan 2006 15:04:05 -0700", "Mon, 02 Jan 2006 10:00:00 +0100",
            utc(2006, 1, 2, 22, 4, 5), utc(2006, 1, 2, 9)),
        4: ("2006-01-02T15:04:05Z", "2006-01-02T10:00:00Z", utc(2006, 1, 2, 15, 4, 5), utc(2006, 1, 2, 10)),
        5: ("2006-01-02T15:04:05.123456Z", "2006-01-02T10:00:00.25Z",
            utc(2006, 1, 2, 15, 4, 5) + timedelta(microseconds=123456), utc(2006, 1, 2, 10) + timedelta(milliseconds=250)),
        6: ("2006-01-02T15:04:05.5+02:00", "2006-01-02T10:00:00.001-05:30",
            utc(2006, 1, 2, 13, 4, 5) + timedelta(milliseconds=500), utc(2006, 1, 2, 15, 30) + timedelta(milliseconds=1)),
    }
    # Go's RFC3339Nano: nine digits; at least the microseconds are kept
    cases[7] = ("2006-01-02T15:04:05.123456789Z", "2006-01-02t10:00:00.000001z",
                utc(2006, 1, 2, 15, 4, 5) + timedelta(microseconds=123456), utc(2006, 1, 2, 10) + timedelta(microseconds=1))
    for mention_id, (tx, md, _, _) in cases.items():
        bb.publish(pb.mention_event("Inserted", mention_id, 3, tx, md))
    bb.wait_acked()
    rows = bb.rows()
    assert bb.queue_depth(bb.dlq) == 0
    for mention_id, (_, _, tx, md) in cases.items():
        assert rows.get(mention_id) == (3, md, tx, False), (mention_id, cases[mention_id][:2], rows.get(mention_id))


def _send_in_order(bb: BlackBox, events: list[tuple[str, int, int | None, str, str | None]], *, separately: bool) -> None:
    for kind, mention_id, org, tx, md in events:
        bb.publish(pb.mention_event(kind, mention_id, org, tx, md), "events.Mention" + kind)
        if separately:
            bb.barrier()  # its own batch: the order is the delivery order, not the batch's sorting
    bb.barrier()


def test_late_insert_or_update_never_revives_and_newer_insert_does(bb: BlackBox) -> None:
    bb.indexer()
    t1, t2, t3, _t4 = ("2020-01-01T00:00:01Z", "2020-01-01T00:00:02Z", "2020-01-01T00:00:03Z", "2020-01-01T00:00:04Z")
    _send_in_order(bb, [
        # 1: Delete at t3, then a late Insert (t1) and a late Update (t2)
        ("Inserted", 1, 5, t1, None), ("Deleted", 1, 5, t3, None), ("Inserted", 1, 5, t1, None), ("Updated", 1, 6, t2, None),
        # 2: the Delete arrives first, then older Insert and Update (never seen the mention)
        ("Deleted", 2, 5, t3, None), ("Updated", 2, 6, t2, None), ("Inserted", 2, 5, t1, None),
        # 3: a newer Insert after a Delete revives
        ("Inserted", 3, 5, t1, None), ("Deleted", 3, 5, t2, None), ("Inserted", 3, 7, t3, None),
        # 4: same timestamp, Delete ranks above Insert and Update whatever the order
        ("Deleted", 4, 5, t2, None), ("Inserted", 4, 5, t2, None), ("Updated", 4, 5, t2, None),
    ], separately=True)
    rows = bb.rows()
    assert rows[1][2:] == (utc(2020, 1, 1, 0, 0, 3), True), rows[1]
    assert rows[2][2:] == (utc(2020, 1, 1, 0, 0, 3), True), rows[2]
    assert rows[3] == (7, None, utc(2020, 1, 1, 0, 0, 3), False), rows[3]
    assert rows[4][2:] == (utc(2020, 1, 1, 0, 0, 2), True), rows[4]


def test_offsets_are_compared_as_instants_not_as_wall_clocks(bb: BlackBox) -> None:
    bb.indexer()
    _send_in_order(bb, [
        # 22:04:05Z (RFC1123Z -0700) then a Delete at 20:00Z: the Delete is older
        ("Inserted", 1, 5, "Mon, 02 Jan 2006 15:04:05 -0700", None), ("Deleted", 1, 5, "2006-01-02T20:00:00Z", None),
        # Delete at 23:00Z (16:00 -0700) then an Insert at 22:30Z: the Insert is older
        ("Deleted", 2, 5, "Mon, 02 Jan 2006 16:00:00 -0700", None), ("Inserted", 2, 5, "2006-01-02T22:30:00Z", None),
    ], separately=True)
    rows = bb.rows()
    assert rows[1][3] is False, rows[1]
    assert rows[2][3] is True, rows[2]


def test_one_microsecond_orders_changes(bb: BlackBox) -> None:
    bb.indexer()
    _send_in_order(bb, [
        ("Inserted", 1, 5, "2021-06-01T12:00:00.000001Z", None),
        ("Deleted", 1, 5, "2021-06-01T12:00:00.000002Z", None),
        ("Updated", 1, 5, "2021-06-01T12:00:00.000003Z", None),  # newer by 1 µs than the Delete
        ("Deleted", 2, 5, "2021-06-01T12:00:00.100000Z", None),
        ("Updated", 2, 5, "2021-06-01T12:00:00.099999Z", None),  # older by 1 µs than the Delete
    ], separately=True)
    rows = bb.rows()
    assert rows[1] == (5, None, utc(2021, 6, 1, 12) + timedelta(microseconds=3), False), rows[1]
    assert rows[2][2:] == (utc(2021, 6, 1, 12) + timedelta(microseconds=100000), True), rows[2]


def test_equal_timestamp_and_kind_converge_in_both_orders(bb: BlackBox) -> None:
    bb.indexer()
    tx = "2022-02-02T02:02:02Z"
    variants = [  # different contents, same version (timestamp, kind)
        ("Updated", 6, "2022-01-01T00:00:00Z"), ("Updated", 9, "2021-01-01T00:00:00Z"),
        ("Updated", 7, None),
    ]
    deletes = [("Deleted", 6, None), ("Deleted", 8, None)]
    orders = list(itertools.permutations(variants))
    for index, order in enumerate(orders):  # one mention per order, one batch per message
        _send_in_order(bb, [(kind, 100 + index, org, tx, md) for kind, org, md in order], separately=True)
    for index, order in enumerate(orders):  # the same, all at once (batches coalesce)
        _send_in_order(bb, [(kind, 200 + index, org, tx, md) for kind, org, md in order], separately=False)
    rows = bb.rows()
    finals = {mention_id: (row[0], row[1], row[3]) for mention_id, row in rows.items()}
    assert len(set(finals.values())) == 1, f"replicas diverge: {finals}"
    # ties between Deletes (naming different organizations) and between Inserts too
    for index, order in enumerate(itertools.permutations(deletes)):
        _send_in_order(bb, [("Inserted", 400 + index, 1, "2022-01-01T00:00:00Z", None)] +
                       [(kind, 400 + index, org, tx, md) for kind, org, md in order], separately=True)
    rows = bb.rows()
    assert rows[400] == rows[401], (rows[400], rows[401])
    ins = [("Inserted", 3, "2022-01-01T00:00:00Z"), ("Inserted", 3, "2022-01-05T00:00:00Z")]
    for index, order in enumerate(itertools.permutations(ins)):
        _send_in_order(bb, [(kind, 300 + index, org, tx, md) for kind, org, md in order], separately=True)
    rows = bb.rows()
    assert rows[300] == rows[301], (rows[300], rows[301])


def test_any_delivery_order_and_duplicates_give_the_same_table(bb: BlackBox) -> None:
    bb.indexer()
    events = [
        ("Inserted", 5, "2023-01-01T00:00:01Z", "2022-12-31T00:00:00Z"),
        ("Updated", 6, "2023-01-01T00:00:02Z", "2022-12-30T00:00:00Z"),
        ("Updated", 7, "Sun, 01 Jan 2023 00:00:02 +0000", None),  # same instant as the one above, no date
        ("Deleted", 6, "2023-01-01T00:00:03.5Z", None),
        ("Updated", 8, "Sun, 01 Jan 2023 00:00:03 UTC", "2022-12-29T00:00:00Z"),  # older than the Delete
        ("Inserted", 9, "2023-01-01T00:00:04Z", None),  # revives; carries no date
    ]
    rng = random.Random(7)
    for mention_id in range(1, 21):
        order = events + rng.sample(events, 3)  # with duplicates
        rng.shuffle(order)
        _send_in_order(bb, [(kind, mention_id, org, tx, md) for kind, org, tx, md in order],
                       separately=mention_id <= 2)
    rows = bb.rows()
    finals = {row[1:] + (row[0],) for row in rows.values()}
    assert len(rows) == 20 and len(finals) == 1, rows
    org, mention_date, tx, deleted = next(iter(rows.values()))
    assert (org, tx, deleted) == (9, utc(2023, 1, 1, 0, 0, 4), False)
    # mention_date is null only where no change ever carried one
    assert mention_date is not None, "a change without mention_date erased the stored one"


def test_a_change_without_mention_date_keeps_the_stored_one(bb: BlackBox) -> None:
    bb.indexer()
    _send_in_order(bb, [
        ("Inserted", 1, 5, "2024-01-01T00:00:01Z", "2023-12-31T00:00:00Z"),
        ("Updated", 1, 5, "2024-01-01T00:00:02Z", None),
    ], separately=True)
    assert bb.row(1) == (5, utc(2023, 12, 31), utc(2024, 1, 1, 0, 0, 2), False)
