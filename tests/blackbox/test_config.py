"""Configuration: variables, flags that override them, exit 2 naming what to fix, passwords never shown."""

from __future__ import annotations

import time

from tests.blackbox import pb
from tests.blackbox.harness import MASKED_PASSWORD, BlackBox
from tests.support.process import free_port
from tests.support.services import DEFAULTS  # the documented defaults of the three URLs


def test_bad_values_exit_2_naming_the_variable_without_the_password(bb: BlackBox) -> None:
    cases = [
        ("run", {"INDEXER_HTTP_PORT": "abc"}, (), "INDEXER_HTTP_PORT"),
        ("run", {"INDEXER_HTTP_PORT": "70000"}, (), "INDEXER_HTTP_PORT"),
        ("migrate", {"INDEXER_SCHEMA": "bad-name; drop"}, (), "INDEXER_SCHEMA"),
        ("migrate", {"DATABASE_URL": "mysql://root:my-s3cr3t@db:3306/x"}, (), "DATABASE_URL"),
        ("migrate", {"DATABASE_URL": "postgresql://postgres:my-s3cr3t@127.0.0.1:port/x"}, (), "DATABASE_URL"),
        ("run", {"REDIS_URL": "http://user:my-s3cr3t@127.0.0.1:6379/0"}, (), "REDIS_URL"),
        ("refresh-cache", {"AMQP_URL": "http://guest:my-s3cr3t@127.0.0.1:5672/"}, (), "AMQP_URL"),
        ("run", {}, ("--http-port", "abc"), "http"),
        ("migrate", {}, ("--database-url", "mysql://root:my-s3cr3t@db/x"), "DATABASE_URL"),
        ("backfill", {"SOURCE_DATABASE_URL": "mysql://root:my-s3cr3t@db/x"}, (), "SOURCE_DATABASE_URL"),
        ("run", {}, ("--no-such-flag",), "no-such-flag"),
    ]
    failures = []
    for command, env, args, named in cases:
        started = time.monotonic()
        result = bb.cli(command, *args, timeout_s=20, **env)
        text = result.out + result.err
        if result.code != 2 or named.lower() not in result.err.lower() or "my-s3cr3t" in text:
            failures.append(f"{command} {env} {args}: expected exit 2 naming {named}, no password; got {result}")
        assert time.monotonic() - started < 20
    assert not failures, "\n\n".join(failures)


def test_a_flag_overrides_its_variable(bb: BlackBox) -> None:
    env_schema = f"{bb.unique}_env"
    bb.extra_schemas.append(env_schema)
    result = bb.cli("migrate", "--schema", bb.schema, "--database-url", bb.database_url,
                    INDEXER_SCHEMA=env_schema, DATABASE_URL="postgresql://postgres:x@127.0.0.1:1/postgres")
    assert result.code == 0, result
    schemas = {name for (name,) in bb.sql("SELECT nspname FROM pg_namespace WHERE nspname IN (%s, %s)",
                                          (bb.schema, env_schema))}
    assert schemas == {bb.schema}, schemas
    # a bad variable does not matter when the flag gives the value
    port = free_port()
    proc = bb.indexer(start=False, args=("--http-port", str(port), "--queue", bb.queue),
                      INDEXER_HTTP_PORT="abc", INDEXER_QUEUE=f"{bb.unique}.wrong")
    proc.port = port
    proc.start()
    bb.extra_queues += [f"{bb.unique}.wrong", f"{bb.unique}.wrong.dlq"]
    assert bb.queue_depth(bb.queue) is not None, "--queue did not override INDEXER_QUEUE"
    assert bb.queue_depth(f"{bb.unique}.wrong") is None, "INDEXER_QUEUE was used although --queue was given"


def test_defaults_point_at_local_services(bb: BlackBox) -> None:
    if (bb.database_url, bb.redis_url, bb.amqp_url) != tuple(DEFAULTS.values()):
        import pytest

        pytest.skip("the services of this run are not at the documented defaults")
    env = bb.env()
    for name in DEFAULTS:
        del env[name]
    result = bb.cli("migrate", env=env)
    assert result.code == 0, result
    port = str(free_port())
    proc = bb.indexer(start=False, INDEXER_HTTP_PORT=port)
    for name in DEFAULTS:
        del proc.env[name]
    proc.start()
    bb.publish(pb.mention_event("Inserted", 1, 1, "2020-01-01T00:00:00Z"))
    bb.wait_row(1)


def test_no_password_in_logs_or_health_while_services_are_unreachable(bb: BlackBox) -> None:
    bad = {
        "DATABASE_URL": "postgresql://postgres:pg-s3cr3t@127.0.0.1:1/postgres",
        "REDIS_URL": "redis://default:rd-s3cr3t@127.0.0.1:1/0",
        "AMQP_URL": "amqp://guest:mq-s3cr3t@127.0.0.1:1/",
    }
    procs = {name: bb.indexer(start=False, INDEXER_LOG_LEVEL="DEBUG", INDEXER_RETRY_MAX_S="0.5", **{name: url})
             for name, url in bad.items()}
    for proc in procs.values():
        proc.start(wait_ready=False)
    bodies = {}
    for name, proc in procs.items():
        bodies[name] = proc.wait_http("/readyz", 503, timeout_s=15)
    time.sleep(1)  # a few retries, each logging its failure
    for name, proc in procs.items():
        code, elapsed = proc.terminate(timeout_s=10)
        log = proc.log_path.read_text(errors="replace")
        secret = bad[name].split(":")[2].split("@")[0]
        assert secret not in log, f"{name}: the password is in the log\n{proc.tail()}"
        assert secret not in bodies[name], f"{name}: the password is in /readyz: {bodies[name]}"
        assert "127.0.0.1:1" in log or "127.0.0.1:1" in bodies[name], f"{name}: the unreachable URL is never named\n{proc.tail()}"
        assert code == 0 and elapsed < 10, f"{name}: SIGTERM while retrying gave exit {code} after {elapsed:.1f}s"


def test_no_password_in_debug_logs_of_a_working_indexer(bb: BlackBox) -> None:
    # Postgres and Redis of the test services accept any password; RabbitMQ's is guest's.
    db = bb.database_url.replace("postgresql://postgres@", "postgresql://postgres:pg-s3cr3t@", 1)
    rd = bb.redis_url.replace("redis://", "redis://default:rd-s3cr3t@", 1) if "@" not in bb.redis_url else bb.redis_url
    proc = bb.indexer(INDEXER_LOG_LEVEL="DEBUG", DATABASE_URL=db, REDIS_URL=rd)
    bb.publish(pb.mention_event("Inserted", 1, 1, "2020-01-01T00:00:00Z"))
    bb.publish(b"\x0a\xff", content_type=None)
    bb.wait_row(1)
    bb.wait_acked()
    code, _ = proc.terminate()
    assert code == 0
    log = proc.log_path.read_text(errors="replace")
    leaks = [s for s in ("pg-s3cr3t", "rd-s3cr3t", ":guest@") if s in log]
    assert not leaks, f"passwords {leaks} in the log:\n" + "\n".join(
        line for line in log.splitlines() if any(s in line for s in leaks))[:3000]


def test_commands_mask_the_password_in_what_they_print(bb: BlackBox) -> None:
    db = bb.database_url.replace("postgresql://postgres@", "postgresql://postgres:pg-s3cr3t@", 1)
    for args in (("migrate",), ("backfill", "--source-query",
                                "SELECT 1 AS mention_id, 2 AS organization_id, NULL::timestamptz AS mention_date")):
        result = bb.cli(*args, DATABASE_URL=db, INDEXER_LOG_LEVEL="DEBUG")
        assert result.code == 0, result
        assert "pg-s3cr3t" not in result.out + result.err, result


def test_the_mention_indexer_command_exists() -> None:
    import subprocess
    import sys
    from pathlib import Path

    command = Path(sys.executable).parent / "mention-indexer"
    assert command.exists(), f"no {command}"
    done = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done
    for name in ("run", "migrate", "backfill", "audit", "refresh-cache", "emit", "dlq"):
        assert name in done.stdout, (name, done.stdout)
    done = subprocess.run([str(command)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done


def test_an_exchange_of_another_type_is_a_clear_failure(bb: BlackBox) -> None:
    bb.channel.exchange_declare(bb.exchange, "fanout", durable=True)
    proc = bb.indexer(start=False)
    proc.start(wait_ready=False)
    try:
        code = proc.process.wait(20)
    except Exception:
        code = None
    log = proc.log_path.read_text(errors="replace")
    assert code in (1, 2), f"an exchange of type fanout: exit {code}\n{log}"
    assert bb.exchange in log, log
    if code == 1:  # a run-time failure names the service and its URL
        assert "amqp://guest:***@" in log or MASKED_PASSWORD.search(log), f"exit 1 without the masked broker URL:\n{log}"
