"""One message can cost one message, never the batch or the consumer."""

from __future__ import annotations

import pytest

from indexer.errors import Unavailable
from indexer.ingest import wire
from indexer.pipeline import Pipeline
from tests.unit.test_pipeline import Cache, Log, Msg, Sink, Store, change


class BrokenSink(Sink):
    """A sink that cannot write one particular letter, whatever is tried."""

    def __init__(self, log: Log, broken: bytes) -> None:
        super().__init__(log)
        self.broken = broken

    async def dead_letter(self, delivery: Msg, reason: str) -> None:
        if delivery.body == self.broken:
            raise RuntimeError("header nobody can encode")
        await super().dead_letter(delivery, reason)


async def test_a_letter_that_cannot_be_written_is_held_and_the_rest_goes_on() -> None:
    log = Log()
    poison, junk = Msg(b"\xff first junk"), Msg(b"\xff second junk")
    pipeline = Pipeline(Store(log), Cache(log), BrokenSink(log, poison.body), max_message_bytes=4096)
    outcome = await pipeline.handle([change(1, 10), poison, junk, change(2, 11)])
    assert outcome.held == [poison]
    assert outcome.dead_lettered == 1 and outcome.applied == 2
    assert [step for step, _ in log.steps] == ["dead_letter", "commit", "invalidate"]


async def test_a_transient_failure_to_dead_letter_still_stops_the_batch() -> None:
    class Down(Sink):
        async def dead_letter(self, delivery: Msg, reason: str) -> None:
            raise Unavailable("rabbitmq", "amqp://h/", "connection lost")

    log = Log()
    with pytest.raises(Unavailable):
        await Pipeline(Store(log), Cache(log), Down(log), max_message_bytes=4096).handle([Msg(b"\xff"), change(1, 10)])
    assert log.steps == []  # nothing committed: the batch comes back whole


async def test_a_codec_that_raises_anything_costs_only_that_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real = wire.decode

    def flaky(body: bytes, content_type: str | None, *, max_bytes: int) -> object:
        if body == b"boom":
            raise RecursionError("maximum recursion depth exceeded")
        return real(body, content_type, max_bytes=max_bytes)

    monkeypatch.setattr(wire, "decode", flaky)
    log = Log()
    outcome = await Pipeline(Store(log), Cache(log), Sink(log), max_message_bytes=4096).handle(
        [Msg(b"boom"), change(1, 10)]
    )
    assert outcome.dead_lettered == 1 and outcome.applied == 1
    assert log.steps[0] == ("dead_letter", "cannot be decoded: RecursionError: maximum recursion depth exceeded")
