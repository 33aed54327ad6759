"""Fixtures of the black-box suite: one ``BlackBox`` (unique names, cleanup) per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.blackbox.harness import BlackBox


@pytest.fixture
def bb(services, unique: str, tmp_path: Path) -> Iterator[BlackBox]:  # services, unique: tests/conftest.py
    box = BlackBox(services.database_url, services.redis_url, services.amqp_url, unique, tmp_path)
    try:
        yield box
    finally:
        box.close()
