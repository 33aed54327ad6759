"""Messages on the wire, published with pika and encoded without the product's code."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

import pika

from tests.blackbox import pb
from tests.blackbox.harness import BlackBox

TS = "Mon, 02 Jan 2006 15:04:05 UTC"
TS_INSTANT = datetime(2006, 1, 2, 15, 4, 5, tzinfo=timezone.utc)  # what TS stands for


def test_binding_keys_are_the_four_full_protobuf_names(bb: BlackBox) -> None:
    bb.indexer()
    for key in ("events.MentionInserted", "events.MentionUpdated", "events.MentionDeleted",
                "events.TriggerCacheRefresh"):
        # mandatory=True: raises UnroutableError when no queue is bound for the key
        bb.publish(pb.refresh_event("1"), key)
    try:
        bb.publish(pb.refresh_event("1"), "events.JobCreated")
        raise AssertionError("events.JobCreated was routed to a queue, but only the four keys are bound")
    except pika.exceptions.UnroutableError:
        pass
    bb.wait_acked()
    assert bb.queue_depth(bb.dlq) == 0


def test_the_binding_list_is_configurable(bb: BlackBox) -> None:
    bb.indexer(INDEXER_BINDINGS="events.MentionInserted,legacy.#")
    bb.publish(pb.mention_event("Inserted", 1, 1, TS), "events.MentionInserted")
    bb.publish(pb.mention_event("Deleted", 1, 1, "Mon, 02 Jan 2006 15:04:06 UTC"), "legacy.anything")
    try:
        bb.publish(pb.mention_event("Deleted", 2, 1, TS), "events.MentionDeleted")
        raise AssertionError("events.MentionDeleted is still bound although INDEXER_BINDINGS leaves it out")
    except pika.exceptions.UnroutableError:
        pass
    bb.wait_acked()
    assert bb.row(1)[3] is True


def test_topology_topic_exchange_durable_quorum_queue_and_dlq(bb: BlackBox) -> None:
    import shutil
    import subprocess

    bb.indexer()
    # Re-declaring with other properties fails: these succeed only if they match.
    bb.channel.exchange_declare(bb.exchange, "topic", passive=False, durable=True)
    bb.channel.queue_declare(bb.queue, passive=True)
    bb.channel.queue_declare(bb.dlq, passive=True)
    ctl = shutil.which("rabbitmqctl")
    if ctl is not None:
        out = subprocess.run([ctl, "-q", "list_queues", "--no-table-headers", "name", "type", "durable"],
                             capture_output=True, text=True, timeout=30).stdout
        info = {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}
        assert info.get(bb.queue) == ["quorum", "true"], info.get(bb.queue)
        assert info.get(bb.dlq, ["?", "?"])[1] == "true", info.get(bb.dlq)


def test_each_accepted_content_type_is_applied(bb: BlackBox) -> None:
    bb.indexer()
    bodies = {
        1: ("application/x-protobuf", pb.mention_event("Inserted", 1, 11, TS)),
        2: ("application/octet-stream", pb.mention_event("Inserted", 2, 11, TS)),
        3: (None, pb.mention_event("Inserted", 3, 11, TS)),
        9: ("application/x-protobuf; proto=events.VtEvent", pb.mention_event("Inserted", 9, 11, TS)),
        10: ("Application/Octet-Stream", pb.mention_event("Inserted", 10, 11, TS)),
        4: ("application/x-protobuf", pb.protoc_encode(f"""
                core {{ id: "0f8fad5b-d9cb-469f-a165-70867728950e" application_id: "system" }}
                data {{ [type.googleapis.com/events.MentionInserted] {{
                    payload {{ mention_id: 4 organization_id: 11 transaction_timestamp: "{TS}" }} }} }}""")),
    }
    # what other encoders may legally do: unknown fields (a newer schema), fields out of order,
    # a sub-message split in two occurrences (merged by every protobuf parser)
    payload = pb.mention_data(7, 11, None, TS)
    unknown = pb.f_bytes(99, "from a newer schema") + pb.f_int(98, 5)
    reordered = pb.any_("events.MentionInserted", pb.mention_message(payload + unknown))
    bodies[7] = ("application/x-protobuf",
                 pb.f_bytes(4, reordered) + unknown + pb.f_bytes(1, pb.core(id="x") + pb.f_bytes(42, "?")))
    split = (pb.f_bytes(3, pb.f_int(1, 8)) + pb.f_bytes(3, pb.f_int(2, 11))
             + pb.f_bytes(3, pb.f_bytes(4, TS)))
    bodies[8] = ("application/x-protobuf", pb.vt_event(pb.core(id="y"), pb.any_("events.MentionInserted", split)))
    for content_type, body in bodies.values():
        bb.publish(body, content_type=content_type)
    # proto3 JSON: lowerCamelCase names and int64 as strings (what other JSON encoders print) ...
    bb.publish(json.dumps({
        "core": {"id": "j5", "applicationId": "system"},
        "data": {"@type": "type.googleapis.com/events.MentionInserted",
                 "payload": {"mentionId": "9007199254740993", "organizationId": "11",
                             "mentionDate": "2006-01-02T10:00:00Z", "transactionTimestamp": TS}},
    }).encode(), content_type="application/json")
    # ... and the original field names with int64 as numbers (also proto3 JSON), charset given.
    bb.publish(json.dumps({
        "core": {"id": "j6"},
        "data": {"@type": "type.googleapis.com/events.MentionInserted",
                 "payload": {"mention_id": 6, "organization_id": 11, "transaction_timestamp": TS}},
    }).encode(), content_type="application/json; charset=utf-8")
    bb.wait_acked()
    rows = bb.rows()
    assert bb.queue_depth(bb.dlq) == 0, [(l.headers.get("x-indexer-error")) for l in bb.take_letters(1)]
    for mention_id in (1, 2, 3, 4, 9007199254740993, 6, 7, 8, 9, 10):
        assert mention_id in rows, (mention_id, rows)
        org, _, tx, deleted = rows[mention_id]
        assert (org, tx, deleted) == (11, TS_INSTANT, False), (mention_id, rows[mention_id])
    assert rows[9007199254740993][1] == datetime(2006, 1, 2, 10, tzinfo=timezone.utc)


def test_dispatch_is_on_the_type_inside_data_not_the_routing_key(bb: BlackBox) -> None:
    bb.indexer()
    bb.publish(pb.mention_event("Inserted", 10, 5, TS), "events.MentionInserted")
    bb.wait_acked()
    bb.publish(pb.mention_event("Deleted", 10, 5, "Mon, 02 Jan 2006 15:05:00 UTC"), "events.MentionInserted")
    bb.publish(pb.mention_event("Inserted", 11, 5, TS), "events.TriggerCacheRefresh")
    bb.redis.set(bb.org_key(77), "x")
    bb.publish(pb.refresh_event("77"), "events.MentionInserted")
    bb.wait_acked()
    rows = bb.rows()
    assert rows[10][3] is True, f"a MentionDeleted sent with key events.MentionInserted was not applied as a delete: {rows[10]}"
    assert 11 in rows and rows[11][3] is False
    assert not bb.redis.exists(bb.org_key(77)), "a TriggerCacheRefresh sent with key events.MentionInserted did not flush"


def test_other_valid_event_types_are_acknowledged_and_counted_as_ignored(bb: BlackBox) -> None:
    proc = bb.indexer()
    job = pb.f_bytes(1, "job-1") + pb.f_bytes(2, "1700000000000")
    login = pb.f_bytes(1, "alice") + pb.f_int(6, 42)
    deploy = pb.f_bytes(1, "u") + pb.f_bytes(2, "engine")
    for name, value in (("events.JobCreated", job), ("events.LoginSucceeded", login),
                        ("events.engineBuildDeployFail", deploy)):
        bb.publish(pb.vt_event(pb.core(id=name), pb.any_(name, value)), "events.MentionInserted")
    bb.publish(json.dumps({"core": {"id": "j"}, "data": {"@type": "type.googleapis.com/events.JobCompleted",
                                                         "jobId": "7", "jobStatus": "done"}}).encode(),
               "events.MentionUpdated", content_type="application/json")
    bb.wait_acked()
    assert bb.queue_depth(bb.dlq) == 0
    assert bb.rows() == {}
    metrics = proc.metrics()
    ignored = {name: value for name, value in metrics.items() if "ignored" in name}
    assert ignored and max(ignored.values()) >= 4, f"no metric counts 4 ignored events: {ignored}"


GOOD_HEADERS = {"x-test": "value", "x-int": 7, "x-big": 2**40, "x-bool": True, "x-nested": {"a": "b"},
                "x-list": ["a", 1], "x-when": datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc), "x-decimal": Decimal("1.25"), "x-none": None,
                "x-bytes": b"\xff\x00raw", "x-utf8": "h\u00e9"}


def _unusable(bb: BlackBox) -> dict[str, tuple[bytes, str | None, str]]:
    """name → (body, content type, routing key) of every kind of message that must be dead-lettered:
    undecodable, of an unknown content type, missing a required field, with a bad timestamp or
    organization id, over the size limit."""
    ins = "events.MentionInserted"
    insert = lambda payload: pb.vt_event(pb.core(id="c"), pb.any_("events.MentionInserted", pb.mention_message(payload)))  # noqa: E731
    return {
        "truncated-protobuf": (b"\x0a\xff\xff\xff", "application/x-protobuf", ins),
        "truncated-octet-stream": (b"\x22\x05\x0a\x03", "application/octet-stream", ins),
        "truncated-no-content-type": (b"\x0a\xff\xff\xff", None, ins),
        "not-json": (b"{not json", "application/json", ins),
        "json-not-a-vtevent": (b'{"core": 5}', "application/json", ins),
        "unknown-content-type": (pb.mention_event("Inserted", 500, 1, TS), "text/plain", ins),
        "no-data": (pb.vt_event(pb.core(id="c")), "application/x-protobuf", ins),
        "no-payload": (pb.vt_event(pb.core(id="c"), pb.any_("events.MentionInserted", b"")), "application/x-protobuf", ins),
        "no-mention-id": (insert(pb.mention_data(None, 1, None, TS)), "application/x-protobuf", ins),
        "no-transaction-timestamp": (insert(pb.mention_data(501, 1, None, None)), None, ins),
        "bad-transaction-timestamp": (insert(pb.mention_data(502, 1, None, "yesterday at noon")), None, ins),
        "json-bad-transaction-timestamp": (json.dumps({"data": {
            "@type": "type.googleapis.com/events.MentionUpdated",
            "payload": {"mentionId": "503", "organizationId": "1", "transactionTimestamp": "2006-13-45"}}}).encode(),
            "application/json", "events.MentionUpdated"),
        "refresh-org-star": (pb.refresh_event("*"), None, "events.TriggerCacheRefresh"),
        "refresh-org-1star": (pb.refresh_event("1*"), None, "events.TriggerCacheRefresh"),
        "refresh-org-abc": (pb.refresh_event("abc"), None, "events.TriggerCacheRefresh"),
        "refresh-org-glob-class": (pb.refresh_event("[1-9]"), None, "events.TriggerCacheRefresh"),
        "json-refresh-org-star": (json.dumps({"core": {"organizationId": "*"}, "data": {
            "@type": "type.googleapis.com/events.TriggerCacheRefresh"}}).encode(),
            "application/json", "events.TriggerCacheRefresh"),
        "over-size-limit": (pb.mention_event("Inserted", 504, 1, TS, baggage={"pad": "x" * 2000}),
                            "application/x-protobuf", ins),
    }


def test_every_unusable_message_is_dead_lettered_with_body_properties_and_reason(bb: BlackBox) -> None:
    bb.indexer(INDEXER_MAX_MESSAGE_BYTES="1024")
    keys = [bb.org_key(org) for org in (1, 12, 42)]
    for k in keys:
        bb.redis.set(k, "cached")
    cases = _unusable(bb)
    for number, (name, (body, content_type, routing_key)) in enumerate(cases.items()):
        bb.publish(body, routing_key, content_type=content_type, message_id=name, correlation_id=f"corr-{number}",
                   app_id="blackbox", type="t-" + name, timestamp=1700000000 + number, priority=3,
                   reply_to="nowhere", headers={**GOOD_HEADERS, "x-case": name})
    # the consumer did not stop: a good message behind them is applied
    bb.publish(pb.mention_event("Inserted", 999, 777, TS))
    bb.wait_row(999)
    bb.wait_acked()
    letters = {letter.properties.message_id: letter for letter in bb.take_letters(len(cases))}
    assert sorted(letters) == sorted(cases), f"missing: {set(cases) - set(letters)}, extra: {set(letters) - set(cases)}"
    problems = []
    for number, (name, (body, content_type, _)) in enumerate(cases.items()):
        letter = letters[name]
        p = letter.properties
        headers = letter.headers
        reason = headers.get("x-indexer-error")
        if isinstance(reason, bytes):
            reason = reason.decode()
        checks = {
            "body": letter.body == body,
            "content_type": p.content_type == content_type,
            "correlation_id": p.correlation_id == f"corr-{number}",
            "app_id": p.app_id == "blackbox",
            "type": p.type == "t-" + name,
            "timestamp": p.timestamp == 1700000000 + number,
            "priority": p.priority == 3,
            "reply_to": p.reply_to == "nowhere",
            "headers": all(headers.get(k) == v for k, v in {**GOOD_HEADERS, "x-case": name}.items()),
            "x-indexer-error": isinstance(reason, str) and reason.strip() != "",
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            problems.append(f"{name}: {bad} (properties {p}, reason {reason!r})")
    assert not problems, "\n".join(problems)
    # a garbage organization id is never used as a key pattern
    assert bb.existing(keys) == set(keys)
    rows = bb.rows()
    assert set(rows) == {999}, rows


def test_size_limit_boundary(bb: BlackBox) -> None:
    bb.indexer(INDEXER_MAX_MESSAGE_BYTES="1024")
    base = pb.mention_event("Inserted", 1, 1, TS, baggage={"p": ""})

    def sized(mention_id: int, size: int) -> bytes:
        pad = "x" * (size - len(base) - 2)  # the pad's length prefix grows by one byte past 127
        body = pb.mention_event("Inserted", mention_id, 1, TS, baggage={"p": pad})
        while len(body) > size:
            pad = pad[:-1]
            body = pb.mention_event("Inserted", mention_id, 1, TS, baggage={"p": pad})
        assert len(body) == size, len(body)
        return body

    bb.publish(sized(1, 1024))
    bb.publish(sized(2, 1025))
    bb.wait_acked()
    assert set(bb.rows()) == {1}
    letters = bb.take_letters(1)
    assert len(letters) == 1 and len(letters[0].body) == 1025


def test_random_garbage_never_stops_the_consumer(bb: BlackBox) -> None:
    import random

    bb.indexer()
    rng = random.Random(1234)
    bodies = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(150)]
    for body in bodies:
        bb.publish(body, content_type=rng.choice([None, "application/x-protobuf", "application/json"]))
    bb.publish(pb.mention_event("Inserted", 4242, 1, TS))
    bb.wait_row(4242)
    bb.wait_acked()
    depth = bb.queue_depth(bb.dlq) or 0
    assert depth == len(bodies), f"{len(bodies)} garbage bodies, {depth} dead letters: some were dropped or applied"
    assert set(bb.rows()) == {4242}
