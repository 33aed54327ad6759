"""URLs with passwords may come from files, as Kubernetes mounts secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from indexer.config import SECRET_FIELDS, load_settings, variable
from indexer.errors import ConfigError

SECRET = "pa55-from-a-file"
URLS = {
    "DATABASE_URL": f"postgresql://app:{SECRET}@db.internal:5432/mentions",
    "SOURCE_DATABASE_URL": f"postgresql://reader:{SECRET}@db.internal:5432/mentions",
    "REDIS_URL": f"redis://:{SECRET}@cache.internal:6379/0",
    "AMQP_URL": f"amqp://indexer:{SECRET}@mq.internal:5672/",
}


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in URLS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)


def test_every_url_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert {variable(name) for name in SECRET_FIELDS} == set(URLS)
    for name, url in URLS.items():
        path = tmp_path / name.lower()
        path.write_text(url + "\n")  # as an editor or `echo` leaves it
        monkeypatch.setenv(f"{name}_FILE", str(path))
    settings = load_settings()
    assert (settings.database_url, settings.source_database_url, settings.redis_url, settings.amqp_url) == tuple(
        URLS.values()
    )


def test_a_flag_still_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "db").write_text(URLS["DATABASE_URL"])
    monkeypatch.setenv("DATABASE_URL_FILE", str(tmp_path / "db"))
    assert load_settings(database_url="postgresql://other@h/x").database_url == "postgresql://other@h/x"


def test_both_the_variable_and_its_file_is_a_configuration_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "amqp").write_text(URLS["AMQP_URL"])
    monkeypatch.setenv("AMQP_URL_FILE", str(tmp_path / "amqp"))
    monkeypatch.setenv("AMQP_URL", URLS["AMQP_URL"])
    with pytest.raises(ConfigError, match="AMQP_URL and AMQP_URL_FILE are both set") as caught:
        load_settings()
    assert SECRET not in str(caught.value)


def test_an_unreadable_file_names_the_variable_and_path_not_the_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="REDIS_URL_FILE: cannot read"):
        load_settings()


def test_a_bad_url_in_a_file_is_refused_without_echoing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "db").write_text(f"mysql://root:{SECRET}@db/x")
    monkeypatch.setenv("DATABASE_URL_FILE", str(tmp_path / "db"))
    with pytest.raises(ConfigError, match="DATABASE_URL") as caught:
        load_settings()
    assert SECRET not in str(caught.value)
