"""The command line for a test's ``Settings``: the environment a command (or an indexer) gets, and
``indexer.cli.main`` called in this process.  Running it as a subprocess is
tests/support/process.py's job."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest

from indexer import cli
from indexer.config import Settings, variable
from tests.support.process import OUR_VARIABLES, Result, clean_environment


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Every setting of ``settings`` under its variable, on top of the outer environment without
    any of ours (nothing of an outer INDEXER_* leaks in), then ``extra``."""
    env = clean_environment()
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is not None:
            env[variable(name)] = str(value)
    env.update(extra)
    return env


def call_main(
    argv: Sequence[str],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Result:
    """``indexer.cli.main(argv)`` in this process, with ``env`` as the whole environment.

    Logging is left as pytest set it up (``main`` would replace the root handlers).
    """
    for name in list(os.environ):
        if name.startswith("INDEXER_") or name in OUR_VARIABLES:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli, "configure_logging", lambda *_: None)
    capsys.readouterr()
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return Result(code, out, err)
