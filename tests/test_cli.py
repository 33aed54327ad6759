"""The command line's contract: exit 2 for bad usage or configuration with a message saying what to
fix, exit 1 for a run-time failure naming the service and its masked URL, help exits 0.

Configuration errors are found before anything is connected to, so most of these need no service.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.config import Settings
from tests.support.commands import call_main, cli_env
from tests.support.process import Result, clean_environment, run_cli

SECRET = "s3cret"
UNREACHABLE = f"amqp://guest:{SECRET}@127.0.0.1:1/"
UNREACHABLE_MASKED = "amqp://guest:***@127.0.0.1:1/"


def assert_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.err, result.err


def test_bad_variable_exits_2_naming_it_through_the_installed_command() -> None:
    script = shutil.which("mention-indexer", path=str(Path(sys.executable).parent))
    argv = [script, "run"] if script else [sys.executable, "-m", "indexer", "run"]
    done = subprocess.run(argv, env=clean_environment(INDEXER_BATCH_MESSAGES="abc"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "INDEXER_BATCH_MESSAGES" in done.stderr and "'abc'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "env", "names"),
    [
        (["run", "--schema", "bad name"], {}, "INDEXER_SCHEMA"),
        (["migrate"], {"INDEXER_SCHEMA": "drop;table"}, "INDEXER_SCHEMA"),
        (["run"], {"INDEXER_PREFETCH": "10", "INDEXER_BATCH_MESSAGES": "100"}, "INDEXER_PREFETCH"),
        (["run", "--http-port", "70000"], {}, "INDEXER_HTTP_PORT"),
        (["run"], {"INDEXER_QUEUE_TYPE": "stream"}, "INDEXER_QUEUE_TYPE"),
        (["refresh-cache", "--cache-prefix", "a*"], {}, "INDEXER_CACHE_PREFIX"),
        (["refresh-cache"], {"INDEXER_EXCHANGE": "amq.topic"}, "INDEXER_EXCHANGE"),
        (["dlq", "list"], {"INDEXER_QUEUE": ""}, "INDEXER_QUEUE"),
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(
    argv: list[str], env: dict[str, str], names: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = call_main(argv, clean_environment(**env), monkeypatch, capsys)
    assert result.code == 2, result
    assert names in result.err and "configuration error" in result.err
    assert result.out == ""


@pytest.mark.parametrize(
    ("argv", "env", "variable"),
    [
        (["run"], {"AMQP_URL": f"http://guest:{SECRET}@127.0.0.1:5672/"}, "AMQP_URL"),
        (["refresh-cache", "--amqp-url", f"https://guest:{SECRET}@broker/"], {}, "AMQP_URL"),
        (["migrate"], {"DATABASE_URL": f"mysql://root:{SECRET}@db/x"}, "DATABASE_URL"),
        (["run"], {"REDIS_URL": f"http://:{SECRET}@cache:6379/0"}, "REDIS_URL"),
        (["backfill"], {"SOURCE_DATABASE_URL": f"mysql://root:{SECRET}@db/x"}, "SOURCE_DATABASE_URL"),
        # Right scheme, but a port or host that cannot be parsed: exit 2 here, not a crash later.
        (["refresh-cache"], {"AMQP_URL": f"amqp://guest:{SECRET}@127.0.0.1:99999/"}, "AMQP_URL"),
        (["dlq", "list"], {"AMQP_URL": f"amqp://guest:{SECRET}@127.0.0.1:abc/"}, "AMQP_URL"),
        (["emit", "inserted", "--mention-id", "1", "--org", "1"], {"AMQP_URL": f"amqp://guest:{SECRET}@[::1/"}, "AMQP_URL"),
        (["migrate"], {"DATABASE_URL": f"postgresql://postgres:{SECRET}@db:port/x"}, "DATABASE_URL"),
    ],
)
def test_bad_url_exits_2_without_echoing_the_password(
    argv: list[str], env: dict[str, str], variable: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = call_main(argv, clean_environment(**env), monkeypatch, capsys)
    assert result.code == 2, result
    assert variable in result.err
    assert SECRET not in result.err + result.out


def test_bad_url_exits_2_without_echoing_the_password_in_a_subprocess() -> None:
    result = run_cli(clean_environment(AMQP_URL=f"http://guest:{SECRET}@127.0.0.1:5672/"), "run")
    assert result.code == 2 and "AMQP_URL" in result.err
    assert SECRET not in result.err + result.out
    assert_no_traceback(result)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["run"],
        ["migrate"],
        ["backfill"],
        ["refresh-cache"],
        ["emit"],
        ["dlq"],
        ["dlq", "list"],
        ["dlq", "replay"],
        ["dlq", "purge"],
    ],
    ids=lambda argv: " ".join(argv) or "top",
)
def test_help_exits_0(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # An invalid variable in the environment must not stop --help.
    result = call_main([*argv, "--help"], clean_environment(INDEXER_BATCH_MESSAGES="abc"), monkeypatch, capsys)
    assert result.code == 0
    assert result.out.startswith(f"usage: mention-indexer {' '.join(argv)}".rstrip())
    assert result.err == ""


def test_help_exits_0_in_a_subprocess() -> None:
    result = run_cli(clean_environment(), "emit", "--help")
    assert result.code == 0 and "--transaction-timestamp" in result.out and "--mention-id" in result.out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["emit", "inserted", "--org", "1"],                    # --mention-id missing
        ["emit", "moved", "--mention-id", "1", "--org", "1"],  # no such kind
        ["emit", "deleted", "--mention-id", "1"],              # --org missing
        ["dlq"],
        ["dlq", "list", "--limit", "0"],
        ["dlq", "replay", "--limit", "-3"],
        ["backfill", "--batch-size", "0"],
    ],
    ids=lambda argv: " ".join(argv) or "nothing",
)
def test_bad_usage_exits_2(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    result = call_main(argv, clean_environment(), monkeypatch, capsys)
    assert result.code == 2
    assert "usage: mention-indexer" in result.err and "error:" in result.err


@pytest.mark.parametrize(
    "argv",
    [
        ["refresh-cache"],
        ["refresh-cache", "--org", "3"],
        ["emit", "deleted", "--mention-id", "1", "--org", "2"],
        ["dlq", "list"],
        ["dlq", "replay"],
        ["dlq", "purge", "--yes"],
    ],
    ids=" ".join,
)
def test_unreachable_broker_exits_1_naming_the_masked_url(
    argv: list[str], settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = call_main(argv, cli_env(settings, AMQP_URL=UNREACHABLE), monkeypatch, capsys)
    assert result.code == 1, result
    assert f"rabbitmq unavailable at {UNREACHABLE_MASKED}" in result.err
    assert SECRET not in result.err + result.out
    assert result.out == ""


def test_unreachable_and_refused_broker_exit_1_in_a_subprocess(settings: Settings) -> None:
    result = run_cli(cli_env(settings, AMQP_URL=UNREACHABLE), "refresh-cache")
    assert result.code == 1
    assert f"mention-indexer refresh-cache: rabbitmq unavailable at {UNREACHABLE_MASKED}" in result.err
    assert SECRET not in result.err + result.out
    assert_no_traceback(result)
    # The broker answers but refuses the password: still exit 1, still masked.
    wrong = settings.amqp_url.replace("//guest:guest@", f"//guest:{SECRET}@")
    assert SECRET in wrong, "the test services are expected to use guest:guest"
    result = run_cli(cli_env(settings, AMQP_URL=wrong), "dlq", "list")
    assert result.code == 1 and "rabbitmq unavailable at amqp://guest:***@" in result.err
    assert SECRET not in result.err + result.out
    assert_no_traceback(result)
