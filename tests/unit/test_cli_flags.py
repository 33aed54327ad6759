"""The command line is derived from the settings model: one flag per setting, on every command."""

from __future__ import annotations

import pytest

from indexer import cli
from indexer.config import Settings, load_settings, variable
from indexer.errors import ConfigError

# Each command with the arguments it requires.
COMMANDS = {
    "run": ["run"],
    "migrate": ["migrate"],
    "backfill": ["backfill"],
    "audit": ["audit"],
    "refresh-cache": ["refresh-cache"],
    "emit": ["emit", "inserted", "--mention-id", "1", "--org", "1"],
    "dlq list": ["dlq", "list"],
    "dlq replay": ["dlq", "replay"],
    "dlq purge": ["dlq", "purge"],
}
DEFAULTS = Settings()


def _a_valid_value(name: str) -> str:
    value = getattr(DEFAULTS, name)
    return "postgresql://other@127.0.0.1:5432/x" if value is None else str(value)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_setting_has_a_flag_that_overrides_it(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(variable(name), raising=False)
        argv = [*COMMANDS[command], cli.flag_of(name), _a_valid_value(name)]
        settings = cli._settings_from(cli.build_parser().parse_args(argv))
        assert str(getattr(settings, name)) == _a_valid_value(name), (command, name)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_the_models_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    words = COMMANDS[command][:2] if command.startswith("dlq") else COMMANDS[command][:1]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*words, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, info in Settings.model_fields.items():
        assert f"{cli.flag_of(name)} {variable(name)}" in shown, (command, name)
        assert " ".join(str(info.description).split()) in shown, (command, name)


def test_flags_are_named_after_their_variables() -> None:
    assert cli.flag_of("batch_wait_ms") == "--batch-wait-ms"
    assert cli.flag_of("database_url") == "--database-url"
    assert cli.flag_of("schema_name") == "--schema"
    assert cli.flag_of("batch_messages") == "--batch-messages"


def test_audit_options_and_the_audit_settings() -> None:
    args = cli.build_parser().parse_args(
        ["audit", "--json", "--repair", "--dry-run", "--org", "7", "--org", "8", "--source-query", "SELECT 1"]
    )
    assert (args.json, args.repair, args.dry_run, args.org, args.source_query) == (True, True, True, [7, 8], "SELECT 1")
    args = cli.build_parser().parse_args(["audit", "--audit-interval-s", "5", "--audit-sample", "10"])
    settings = cli._settings_from(args)
    assert (settings.audit_interval_s, settings.audit_sample, settings.audit_source_query) == (5, 10, None)
    assert (DEFAULTS.audit_interval_s, DEFAULTS.audit_sample) == (0, 1000)


@pytest.mark.parametrize(
    ("name", "value"),
    [("audit_interval_s", "1.5"), ("audit_interval_s", "-1"), ("audit_sample", "0"), ("audit_source_query", " ; ")],
)
def test_bad_audit_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable(name)):
        load_settings(**{name: value})


def test_backfill_batch_size_is_its_own_option_not_the_live_batch() -> None:
    args = cli.build_parser().parse_args(["backfill", "--batch-size", "7"])
    assert args.batch_size == 7
    assert cli._settings_from(args).batch_messages == DEFAULTS.batch_messages


def test_the_old_batch_size_variable_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INDEXER_BATCH_MESSAGES", raising=False)
    monkeypatch.setenv("INDEXER_BATCH_SIZE", "42")
    assert load_settings().batch_messages == 42
