"""AMQP_URL may list the nodes of a cluster: a connect tries them in turn, starting after the one
that failed.  Two proxies in front of the one broker stand for two nodes."""

from __future__ import annotations

import asyncio

import pytest

from indexer.config import Settings, load_settings
from indexer.errors import Unavailable
from indexer.ingest.session import Session, SessionLost
from indexer.ingest.topology import connect
from tests.support.process import free_port
from tests.support.proxy import TcpProxy
from tests.support.waiting import eventually


async def test_a_node_that_does_not_answer_is_passed_over(settings: Settings) -> None:
    dead = settings.amqp_url.replace(":5672", f":{free_port()}")
    connection, node = await connect(f"{dead},{settings.amqp_url}")
    async with connection:
        assert node == settings.amqp_url


async def test_no_node_answers_names_each_masked(settings: Settings) -> None:
    first, second = (settings.amqp_url.replace(":5672", f":{free_port()}") for _ in range(2))
    with pytest.raises(Unavailable) as caught:
        await connect(f"{first},{second}")
    message = str(caught.value)
    assert "no node answers" in message and message.count("guest:***@") >= 2 and ":guest@" not in message


async def test_a_lost_session_reconnects_to_the_next_node(settings: Settings) -> None:
    with TcpProxy.for_url(settings.amqp_url) as a, TcpProxy.for_url(settings.amqp_url) as b:
        nodes = load_settings(**{**settings.model_dump(), "amqp_url": f"{a.url(settings.amqp_url)},{b.url(settings.amqp_url)}"})
        first = Session(nodes)
        await first.open()
        try:
            assert (a.open_connections, b.open_connections) == (1, 0)
            a.cut()  # node A dies under the session
            with pytest.raises(SessionLost):
                await asyncio.wait_for(first.next_batch(1, 10), 10)
        finally:
            await first.close()
        a.restore()  # A answers again, but B comes first now: it is the one after the node that failed
        second = Session(nodes)
        await second.open()
        try:
            await eventually(lambda: _value(b.open_connections == 1), what="the new session on node B")
            assert a.open_connections == 0
        finally:
            await second.close()


async def _value(value: bool) -> bool:
    return value
