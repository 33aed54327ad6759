"""Where the tests find Postgres, Redis and RabbitMQ.

1. ``DATABASE_URL`` / ``REDIS_URL`` / ``AMQP_URL`` when set;
2. otherwise the documented defaults (below) when something answers there (this machine, CI);
3. otherwise testcontainers, when a Docker engine answers;
4. otherwise fail, saying what to set.
"""

from __future__ import annotations

import os
import socket
from contextlib import ExitStack
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULTS = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
}


@dataclass(frozen=True)
class ServiceUrls:
    database_url: str
    redis_url: str
    amqp_url: str


def _answers(url: str, timeout_s: float = 1.0) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=timeout_s):
            return True
    except OSError:
        return False


def _docker_engine() -> bool:
    try:
        import docker  # testcontainers depends on it

        docker.from_env().ping()
        return True
    except Exception:
        return False


def resolve(stack: ExitStack) -> ServiceUrls:
    urls = {name: os.environ.get(name) or default for name, default in DEFAULTS.items()}
    down = [name for name, url in urls.items() if not _answers(url)]
    if not down:
        return ServiceUrls(urls["DATABASE_URL"], urls["REDIS_URL"], urls["AMQP_URL"])
    if not _docker_engine():
        raise RuntimeError(
            "The tests need Postgres, Redis and RabbitMQ. Nothing answers at "
            + ", ".join(f"{name}={urls[name]}" for name in down)
            + " and no Docker engine is reachable for testcontainers. Start the services, or set "
            "DATABASE_URL, REDIS_URL and AMQP_URL to ones that run (see README, 'Tests')."
        )
    return _containers(stack)


def _containers(stack: ExitStack) -> ServiceUrls:  # pragma: no cover - needs a Docker engine
    from testcontainers.postgres import PostgresContainer
    from testcontainers.rabbitmq import RabbitMqContainer
    from testcontainers.redis import RedisContainer

    pg = stack.enter_context(PostgresContainer("postgres:16-alpine", driver=None))
    rd = stack.enter_context(RedisContainer("redis:7-alpine"))
    mq = stack.enter_context(RabbitMqContainer("rabbitmq:3.13-alpine"))
    return ServiceUrls(
        database_url=pg.get_connection_url(),
        redis_url=f"redis://{rd.get_container_host_ip()}:{rd.get_exposed_port(6379)}/0",
        amqp_url=f"amqp://guest:guest@{mq.get_container_host_ip()}:{mq.get_exposed_port(5672)}/",
    )
