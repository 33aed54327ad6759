"""Keys written directly, on a Redis Cluster: one ``KeyTracker`` per primary (docs/caches.md).

Keyspace notifications, ``CONFIG`` and ``SCAN`` are per node, so each primary gets a tracker of its
own on a plain client of that node (``cluster.NodeMap``): ``notify-keyspace-events`` set there,
its own subscription, its own SCAN per start.  It indexes a key on the key's own node (the index
shares the key's slot); the registry ``P:orgs``, in a slot of its own, is written through the
cluster client.  ``barrier`` pings every primary's subscription.

Following the topology: the slot map is read again every ``_FOLLOW_S`` (every ``_CATCH_UP_S``
while a tracker is not running, e.g. between a primary's death and its replica's promotion), at
once when a subscription is lost, and before a barrier after an invalidation found the map out of
date.  A new or promoted primary gets a tracker (enable, subscribe, SCAN); a primary that became a
replica, or left, is dropped.  Until every primary's tracker runs, the barrier raises
``Unavailable``, so nothing is acknowledged meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from indexer.cache.cluster import NodeMap
from indexer.cache.errors import unavailable
from indexer.cache.tracker import KeyTracker, Tracking, TrackMode
from indexer.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)

_FOLLOW_S = 5.0  # how often the slot map is read again while every tracker runs
_CATCH_UP_S = 0.5  # ... and while one does not


class ClusterKeyTracker(Tracking):
    """``KeyTracker``'s interface (``active``, ``start``, ``barrier``, ``aclose``) over every primary."""

    def __init__(self, nodes: NodeMap, prefix: str, url: str, mode: TrackMode) -> None:
        super().__init__(prefix, url, mode)
        self._nodes = nodes
        self._trackers: dict[str, KeyTracker] = {}
        self._stale = True
        self._wake = asyncio.Event()
        self._follow: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> bool | None:
        """True while every primary is tracked, False if off or fallen back, None otherwise."""
        if self._disabled:
            return False
        states = [tracker.active for tracker in self._trackers.values()]
        if any(state is False for state in states):
            return False
        return True if states and all(states) else None

    @property
    def nodes(self) -> list[str]:
        """The primaries tracked (``host:port``)."""
        return sorted(self._trackers)

    async def start(self) -> None:
        """Track every primary, waiting for each one's start (its SCAN)."""
        if self._disabled:
            return
        await self._refresh()
        self._follow_in_background()
        await _first_failure(await asyncio.gather(*(t.start() for t in self._sync()), return_exceptions=True))

    async def barrier(self) -> None:
        """Every key created on any primary before this call is indexed; ``Unavailable`` otherwise."""
        if self._disabled:
            return
        if self._stale:
            await self._refresh()
        self._follow_in_background()
        trackers = self._sync()
        await _first_failure(await asyncio.gather(*(t.barrier() for t in trackers), return_exceptions=True))

    def map_changed(self) -> None:
        """Read the slot map again before the next barrier (an invalidation found it out of date)."""
        self._stale = True
        self._wake.set()

    async def aclose(self) -> None:
        self._disabled = True
        if self._follow is not None:
            self._follow.cancel()
            await asyncio.gather(self._follow, return_exceptions=True)
        trackers, self._trackers = list(self._trackers.values()), {}
        await asyncio.gather(*(t.aclose() for t in trackers), *self._closing, return_exceptions=True)

    # ---- following the topology ----

    async def _refresh(self) -> None:
        self._stale = True
        await self._nodes.refresh()
        self._stale = False

    def _sync(self) -> list[KeyTracker]:
        """A tracker per primary of the map as it is now; those of former primaries dropped."""
        primaries = {node.name: node for node in self._nodes.primaries()}
        for name in [name for name in self._trackers if name not in primaries]:
            log.info("cache key tracking: %s is no longer a primary, its tracker stops", name)
            task = asyncio.create_task(self._trackers.pop(name).aclose(), name="cache-tracker-drop")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        for name, node in primaries.items():
            if name not in self._trackers:
                tracker = KeyTracker(
                    self._nodes.client(node),
                    self._prefix,
                    self._nodes.url_of(node),
                    self.mode,
                    register=self._register,
                    lost=self.map_changed,
                )
                tracker.client_name = self.client_name
                self._trackers[name] = tracker
        return list(self._trackers.values())

    def _follow_in_background(self) -> None:
        if self._follow is None or self._follow.done():
            self._follow = asyncio.create_task(self._following(), name="cache-tracker-follow")

    async def _following(self) -> None:
        while not self._disabled:
            interval = _FOLLOW_S if self.active else _CATCH_UP_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self._refresh()
                trackers = self._sync()
                # Begins the start of a new (or stopped) tracker; its failure is the barrier's to report.
                await asyncio.gather(*(t.start() for t in trackers if t.active is None), return_exceptions=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round tries again; the barrier reports meanwhile
                log.debug("cache key tracking: reading the slot map failed: %s", exc)

    async def _register(self, orgs: list[int]) -> None:
        with unavailable(self.url):
            await self._nodes.cluster.sadd(self._registry, *orgs)


async def _first_failure(results: list[object]) -> None:
    """Raise the failure that matters most: a ``ConfigError`` first, then any other."""
    failures = [result for result in results if isinstance(result, BaseException)]
    for failure in failures:
        if isinstance(failure, ConfigError):
            raise failure
    for failure in failures:
        if isinstance(failure, Unavailable):
            raise failure
    if failures:
        raise failures[0]
