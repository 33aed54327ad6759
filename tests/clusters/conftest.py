"""Fixtures of the cluster suite: a RabbitMQ cluster and a Redis Cluster of the suite's own.

* ``rabbit_cluster`` / ``redis_cluster`` (module scope: a RabbitMQ cluster takes ~12-20 s to start,
  a Redis Cluster ~3 s): started on free loopback ports in a temporary folder, stopped after the
  module's last test, even when a test failed or the run was interrupted (tests/support/clusters.py
  says how, and what was learned running them here).  The teardown asserts that no process of the
  cluster is left and that its folder is gone.
* ``rabbit`` / ``redis_nodes``: the same clusters, made whole before the test (a node that an
  earlier test killed, and did not restart because it failed, is started again).
* ``machine_services``: the PIDs listening on the machine's own RabbitMQ, epmd and Redis ports before
  any cluster started; the end of the session asserts the very same processes still listen.

Every test under tests/clusters/ is marked ``cluster`` (and ``services``) by tests/conftest.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.support import clusters
from tests.support.clusters import RabbitCluster, RedisCluster


@pytest.fixture(scope="session")
def machine_services() -> Iterator[dict[int, int | None]]:
    before = clusters.listener_pids(clusters.MACHINE_SERVICE_PORTS.values())
    yield before
    after = clusters.listener_pids(clusters.MACHINE_SERVICE_PORTS.values())
    assert after == before, f"the machine's own services changed under the cluster suite: {before} -> {after}"


def _assert_gone(cluster: clusters.RabbitCluster | clusters.RedisCluster) -> None:
    left = clusters.processes_of([cluster.id])
    assert not left, f"{cluster.kind} cluster {cluster.id} left processes behind: {left}"
    assert cluster.root is None or not cluster.root.exists(), f"{cluster.root} left behind"


@pytest.fixture(scope="module")
def rabbit_cluster(machine_services: dict[int, int | None]) -> Iterator[RabbitCluster]:
    if clusters.rabbit_sbin() is None or shutil.which("epmd") is None:
        pytest.skip("RabbitMQ (/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin) or epmd is not installed")
    with RabbitCluster() as cluster:
        yield cluster
    _assert_gone(cluster)


@pytest.fixture(scope="module")
def redis_cluster(machine_services: dict[int, int | None]) -> Iterator[RedisCluster]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli are not installed")
    with RedisCluster() as cluster:
        yield cluster
    _assert_gone(cluster)


@pytest.fixture
def rabbit(rabbit_cluster: RabbitCluster) -> RabbitCluster:
    rabbit_cluster.heal()
    return rabbit_cluster


@pytest.fixture
def redis_nodes(redis_cluster: RedisCluster) -> RedisCluster:
    redis_cluster.heal()
    return redis_cluster


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if clusters.TIMINGS:
        terminalreporter.section("cluster timings")
        for what, seconds in clusters.TIMINGS:
            terminalreporter.write_line(f"{what}: {seconds:.2f} s")
