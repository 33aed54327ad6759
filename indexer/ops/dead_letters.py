"""``mention-indexer dlq list|replay|purge``: what an operator needs to see and fix dead letters."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

from indexer.changes import CacheRefresh, Change
from indexer.config import Settings
from indexer.errors import ConfigError, Refused, Undecodable
from indexer.ingest import DeadLetter, DeadLetterQueue, wire


def summarize(letter: DeadLetter) -> str:
    """A short decoded view of a dead letter, or why it cannot be decoded."""
    try:
        item = wire.decode(letter.body, letter.content_type, max_bytes=len(letter.body) + 1)
    except Undecodable as refusal:
        return f"undecodable ({refusal.reason}), {len(letter.body)} bytes"
    except Refused as refusal:
        return f"unusable ({refusal.reason}), {len(letter.body)} bytes"
    if isinstance(item, Change):
        org = item.organization_id if item.organization_id is not None else "-"
        return f"{item.kind.event_name} mention {item.mention_id} org {org} at {item.transaction_timestamp.isoformat()}"
    if isinstance(item, CacheRefresh):
        return f"TriggerCacheRefresh org {item.organization_id if item.organization_id is not None else 'all'}"
    return f"ignored type {item.type_name}"


def _age(letter: DeadLetter, now: datetime) -> str:
    stamp = letter.headers.get("x-dead-lettered-at")
    when: datetime | None = None
    if isinstance(stamp, str):
        try:
            when = datetime.fromisoformat(stamp)
        except ValueError:
            when = None
    when = when or letter.timestamp
    if when is None:
        return "?"
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


async def _list(settings: Settings, limit: int) -> None:
    async with DeadLetterQueue(settings) as dlq:
        total = await dlq.count()
        letters = await dlq.peek(limit)
    print(f"{total} dead letter(s) in {settings.dlq}")
    now = datetime.now(UTC)
    for number, letter in enumerate(letters, start=1):
        print(f"{number:>4}. age {_age(letter, now):>5}  key {letter.routing_key or '-'}  reason: {letter.reason}")
        print(f"      {summarize(letter)}")
    if total > len(letters):
        print(f"      … {total - len(letters)} more (--limit)")


async def _replay(settings: Settings, limit: int | None) -> None:
    async with DeadLetterQueue(settings) as dlq:
        replayed = await dlq.replay(limit)
        left = await dlq.count()
    print(f"replayed {replayed} dead letter(s) to exchange {settings.exchange}; {left} left in {settings.dlq}")


async def _purge(settings: Settings) -> None:
    async with DeadLetterQueue(settings) as dlq:
        purged = await dlq.purge()
    print(f"purged {purged} dead letter(s) from {settings.dlq}")


_CANCEL_EVERY_S = 0.05


async def _interruptible(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work``; Ctrl-C cancels it for certain and raises ``KeyboardInterrupt`` (exit 130).

    ``asyncio.run`` cancels the task once on Ctrl-C, and that one cancellation can be lost inside
    aio-pika/aiormq (seen on Python 3.11 in about 1 replay in 12: it carried on to the end; the
    ``asyncio.wait_for`` race of 3.11 is the likely cause).  So cancel again until it stops.
    Stopping anywhere is safe: an unacknowledged letter returns to the DLQ when the channel closes.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    interrupted = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
        await task
        return
    try:
        stop = asyncio.ensure_future(interrupted.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=_CANCEL_EVERY_S)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if interrupted.is_set():
        print("interrupted: every dead letter is either still in the DLQ or republished", file=sys.stderr)
        raise KeyboardInterrupt
    task.result()


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.dlq_command == "list":
        asyncio.run(_interruptible(_list(settings, args.limit)))
    elif args.dlq_command == "replay":
        asyncio.run(_interruptible(_replay(settings, args.limit)))
    elif args.dlq_command == "purge":
        if not args.yes:
            raise ConfigError("dlq purge deletes every dead letter for good: add --yes to confirm")
        asyncio.run(_interruptible(_purge(settings)))
    return 0
