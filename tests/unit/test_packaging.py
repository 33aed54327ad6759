"""The deploy files and the command's entry points, checked without a Docker engine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.process import ROOT, clean_environment, command, run_cli


def test_compose_file_is_accepted_by_docker_compose_when_available() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    result = subprocess.run([tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_services_have_healthchecks_and_the_indexer_waits_for_them() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "rabbitmq", "indexer"} <= set(services)
    for name in ("postgres", "redis", "rabbitmq"):
        assert "test" in services[name]["healthcheck"], name
    indexer = services["indexer"]
    assert indexer["depends_on"] == {name: {"condition": "service_healthy"} for name in ("postgres", "redis", "rabbitmq")}
    dockerfile = ROOT / indexer["build"]["context"] / indexer["build"]["dockerfile"]
    assert dockerfile == ROOT / "deploy" / "Dockerfile" and dockerfile.is_file()
    assert 'ENTRYPOINT ["mention-indexer"]' in dockerfile.read_text()


@pytest.mark.parametrize("entry_point", [command(), [str(Path(sys.executable).with_name("mention-indexer"))]])
def test_both_entry_points_list_every_sub_command(entry_point: list[str]) -> None:
    result = subprocess.run([*entry_point, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for sub in ("run", "migrate", "backfill", "refresh-cache", "emit", "dlq"):
        assert sub in result.stdout


def test_no_command_is_bad_usage() -> None:
    result = run_cli(clean_environment(), timeout_s=60)
    assert result.code == 2
    assert "COMMAND" in result.err
