"""What an operator sees from outside: /metrics that move by exactly the traffic sent, /readyz that
notices a lost consumer, JSON logs without passwords, traces that continue the producer's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.blackbox import pb
from tests.blackbox.harness import BlackBox
from tests.support.process import free_port
from tests.support.waiting import eventually_sync

SENTINEL_TS = datetime(2000, 1, 1, tzinfo=UTC)  # the harness's barrier rows


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _insert(mention_id: int, org: int, at: datetime, **kw: object) -> bytes:
    return pb.mention_event("Inserted", mention_id, org, _rfc3339(at), **kw)  # type: ignore[arg-type]


def _value(metrics: dict[str, float], name: str) -> float:
    return metrics.get(name, 0.0)


def test_metrics_move_by_exactly_the_traffic_sent(bb: BlackBox) -> None:
    proc = bb.indexer()
    start = datetime.now(UTC)
    stamps = [start - timedelta(seconds=30 - n) for n in range(3)]
    for n, at in enumerate(stamps, start=1):
        bb.publish(_insert(n, 10 + n, at))
    bb.wait_acked()
    bb.publish(_insert(1, 11, stamps[0]))  # the very same change again: a duplicate
    bb.publish(pb.mention_event("Updated", 2, 12, _rfc3339(stamps[1] - timedelta(seconds=5))))  # older: stale
    bb.publish(pb.vt_event(pb.core(id="job"), pb.any_("events.JobCreated", b"")))  # valid, not ours: ignored
    bb.publish(pb.refresh_event("7"), "events.TriggerCacheRefresh")
    poison = {
        "undecodable": [b"\x0a\xff\xff\xff", b"\x22\x05\x0a\x03"],
        "bad_timestamp": [pb.mention_event("Inserted", 40, 1, "yesterday")],
        "missing_field": [pb.mention_event("Inserted", None, 1, _rfc3339(start))],
        "bad_organization_id": [pb.refresh_event("*")],
    }
    for bodies in poison.values():
        for body in bodies:
            bb.publish(body)
    bb.wait_acked()
    done = datetime.now(UTC)
    metrics = proc.metrics()

    barriers = bb._barriers
    outcome = lambda name: _value(metrics, f'mention_indexer_messages_total{{outcome="{name}"}}')  # noqa: E731
    assert outcome("applied") == 3 + barriers
    assert (outcome("duplicate"), outcome("stale"), outcome("ignored"), outcome("refresh")) == (1, 1, 1, 1)
    assert outcome("dead_lettered") == 5 and outcome("held") == 0
    for reason, bodies in poison.items():
        assert _value(metrics, f'mention_indexer_dead_letters_total{{reason="{reason}"}}') == len(bodies), reason
    # One lag observation per applied change, each its acknowledgement time minus its version.
    assert _value(metrics, "mention_indexer_lag_seconds_count") == 3 + barriers
    versions = [*stamps, *[SENTINEL_TS] * barriers]
    lag_sum = _value(metrics, "mention_indexer_lag_seconds_sum")
    assert sum((start - v).total_seconds() for v in versions) <= lag_sum <= sum((done - v).total_seconds() for v in versions)
    assert _value(metrics, "mention_indexer_last_applied_timestamp_seconds") == pytest.approx(stamps[-1].timestamp(), abs=1e-3)
    assert _value(metrics, "mention_indexer_consumer_registered") == 1
    assert _value(metrics, "mention_indexer_ready") == 1
    for dependency in ("postgres", "redis", "rabbitmq"):
        assert _value(metrics, f'mention_indexer_dependency_up{{dependency="{dependency}"}}') == 1
    assert _value(metrics, "mention_indexer_deliveries_in_hand") == 0
    assert _value(metrics, "mention_indexer_batches_total") >= 1
    assert not [name for name in metrics if name.startswith("indexer_")], "old unprefixed series are gone"


def _close_our_connection(bb: BlackBox) -> bool:
    """Close the indexer's consuming connection from the broker side; False without rabbitmqctl."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return False
    listed = subprocess.run([ctl, "-q", "list_connections", "--no-table-headers", "pid", "client_properties"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    ours = [line.split("\t")[0] for line in listed.splitlines() if f"consumer of {bb.queue}" in line]
    assert ours, f"no connection of ours among:\n{listed}"
    for pid in ours:
        subprocess.run([ctl, "-q", "close_connection", pid, "closed by a test"], timeout=30, check=True)
    return True


def _wait_not_ready(proc: object) -> dict[str, object]:
    def not_ready() -> dict[str, object] | None:
        answer = proc.readyz()  # type: ignore[attr-defined]
        return answer[1] if answer is not None and answer[0] == 503 else None

    return eventually_sync(not_ready, timeout_s=20, interval_s=0.01, what="/readyz 503")


@pytest.mark.parametrize("how", ["queue deleted", "connection closed by the broker"])
def test_readyz_notices_a_lost_consumer_and_recovers_by_itself(bb: BlackBox, how: str) -> None:
    proc = bb.indexer()
    if how == "queue deleted":  # the broker cancels our consumer and leaves the channel open
        bb.channel.queue_delete(bb.queue)
    elif not _close_our_connection(bb):
        pytest.skip("rabbitmqctl is not installed")
    body = _wait_not_ready(proc)
    assert body["ready"] is False and ("consumer" in body["problems"] or "rabbitmq" in body["problems"]), body
    proc.wait_http("/readyz", 200, timeout_s=30)
    bb.publish(_insert(77, 7, datetime.now(UTC)))
    bb.wait_row(77)


def _redis_with_password(tmp: Path, password: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password, "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    eventually_sync(lambda: subprocess.run(["redis-cli", "-p", str(port), "-a", password, "--no-auth-warning", "ping"],
                                           capture_output=True, text=True).stdout.strip() == "PONG",
                    timeout_s=10, what="redis with a password")
    return server, port


def test_json_logs_carry_the_dead_letters_reason_and_id_and_no_password(bb: BlackBox, tmp_path: Path) -> None:
    redis_password, pg_password = "rd-S3cret-9f1", "pg-S3cret-7c2"  # Postgres here trusts: its password is ignored
    server, port = _redis_with_password(tmp_path, redis_password)
    try:
        database_url = bb.database_url.replace("postgres@", f"postgres:{pg_password}@", 1)
        assert pg_password in database_url, "the test services are expected at postgres@"
        secret_file = tmp_path / "redis-url"
        secret_file.write_text(f"redis://:{redis_password}@127.0.0.1:{port}/0\n")
        proc = bb.indexer(INDEXER_LOG_FORMAT="json", INDEXER_LOG_LEVEL="DEBUG", DATABASE_URL=database_url,
                          REDIS_URL=None, REDIS_URL_FILE=str(secret_file))
        bb.publish(pb.mention_event("Inserted", 5, 1, "not a time", event_id="ev-poison-1"))
        bb.publish(_insert(6, 1, datetime.now(UTC)))
        bb.wait_acked()
        outputs = [proc.http("/metrics"), proc.http("/readyz")]
        # A failing command names the service and its URL, masked.
        failed = bb.cli("refresh-cache", AMQP_URL=f"amqp://guest:{redis_password}@127.0.0.1:{free_port()}/")
        assert failed.code == 1 and "amqp://guest:***@" in failed.err
        code, _ = proc.terminate()
        assert code == 0
    finally:
        server.kill()
        server.wait(10)
    log_lines = [line for line in proc.log_path.read_text().splitlines() if line and not line.startswith("=====")]
    entries = [json.loads(line) for line in log_lines]  # every line is one JSON object
    letters = [e for e in entries if e["message"].startswith("dead-lettering")]
    assert len(letters) == 1, letters
    assert letters[0]["event_id"] == "ev-poison-1" and letters[0]["routing_key"] == "events.MentionInserted"
    assert "not a time" in letters[0]["reason"] and letters[0]["reason_class"] == "bad_timestamp"
    everything = "\n".join([*log_lines, *(str(o) for o in outputs), failed.out, failed.err])
    for password in (redis_password, pg_password):
        assert password not in everything
    assert not re.search(r"://[^/\s:@]*:guest@", everything), "the AMQP password must be masked too"


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
JAEGER_TRACE_ID = "00000000000000005a7f2b7a4c3d2e1f"


def test_traces_continue_the_producers_context(bb: BlackBox) -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    proc = bb.indexer(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="indexer-under-test")
    now = datetime.now(UTC)
    w3c = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
    jaeger = {"uber-trace-id": f"{JAEGER_TRACE_ID[16:]}:1a2b3c4d5e6f7081:0:1"}
    for mention_id, context in ((1, w3c), (2, jaeger)):
        body = pb.vt_event(pb.core(id=f"traced-{mention_id}"),
                           pb.any_("events.MentionInserted", pb.mention_message(pb.mention_data(mention_id, 3, None, _rfc3339(now)))),
                           trace_context=context)
        bb.publish(body)
    bb.wait_acked()
    assert proc.terminate()[0] == 0  # flushes the spans
    text = proc.log_path.read_text()
    assert f"0x{TRACE_ID}" in text, proc.tail()
    assert f"0x{JAEGER_TRACE_ID}" in text, proc.tail()
    assert '"name": "batch"' in text and '"name": "apply"' in text and '"name": "ack"' in text
    assert "indexer-under-test" in text
