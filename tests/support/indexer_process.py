"""``python -m indexer run`` as a subprocess for a test's ``Settings``: tests/support/process.py's
``Indexer`` with every setting in its environment and a free ``INDEXER_HTTP_PORT`` (so /readyz can
be polled)."""

from __future__ import annotations

from pathlib import Path

from indexer.config import Settings
from tests.support.commands import cli_env
from tests.support.process import Indexer, free_port


class IndexerProcess(Indexer):
    def __init__(self, settings: Settings, log_path: Path) -> None:
        super().__init__(cli_env(settings, INDEXER_HTTP_PORT=str(free_port())), log_path)
        self.settings = settings
