"""The cached entries as the audit sees them (docs/audit.md): each with the epoch it was filled
under, next to its organization's epoch.

A value filled through the helper records the epoch it was filled under (``keys.entry_header``).
It is fresh while that is still the organization's epoch: every invalidation moves the epoch on,
so an entry that outlived one (restored by a failover, by a ``RESTORE`` of an old dump) carries an
older epoch and is *stale*; the helper never serves it (``reader``).  A key written without the
helper records nothing: it cannot be verified.

``CacheInspector.keys`` walks the prefix's data keys with SCAN (``P:{*``, the tracker's one walk;
for the ``audit`` command, never for an event); ``sample`` picks indexed keys at random from the
registry and the indexes, without walking anything.  ``inspect`` reads the epoch and the heads of
some keys of one organization in one atomic script, so an entry is never judged against an
epoch read at another moment.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from indexer.cache.client import AsyncClient, ClusterMode, OwnedAsyncClient
from indexer.cache.errors import unavailable
from indexer.cache.keys import (
    HEADER_MAX_BYTES,
    check_prefix,
    data_key_pattern,
    epoch_key,
    index_key,
    parse_data_key,
    recorded_epoch,
    registry_key,
)
from indexer.cache.scripts import DROP_STALE_LUA, ENTRIES_LUA
from indexer.ids import InvalidId, parse_id

if TYPE_CHECKING:
    from indexer.config import Settings

_KEYS_PER_SCRIPT = 500  # bounds one script's run (and the Lua stack of its arguments)
_SCAN_COUNT = 1000
_SAMPLE_ORGS = 100  # organizations drawn per sample


@dataclass(frozen=True, slots=True)
class EntryState:
    key: bytes
    exists: bool
    indexed: bool
    """In the organization's index: only indexed keys are ever served."""
    epoch: bytes | None
    """The epoch it was filled under; None for a key written without the helper (or missing)."""
    header: bytes | None


@dataclass(frozen=True, slots=True)
class OrgEntries:
    org: int
    epoch: bytes | None
    """The organization's epoch (None: none yet, or evicted)."""
    entries: tuple[EntryState, ...]

    @property
    def present(self) -> list[EntryState]:
        return [entry for entry in self.entries if entry.exists]

    @property
    def stale(self) -> list[EntryState]:
        """Entries filled under another epoch than the current one."""
        return [e for e in self.present if e.epoch is not None and e.epoch != self.epoch]

    @property
    def unverifiable(self) -> list[EntryState]:
        """Keys written without the helper: no epoch recorded."""
        return [entry for entry in self.present if entry.epoch is None]


class CacheInspector(OwnedAsyncClient):
    """Reads entries with their recorded epochs, and deletes the stale ones, for one prefix.

    Every Redis failure that may pass is raised as ``Unavailable``."""

    def __init__(self, client: AsyncClient | str, prefix: str, *, cluster: ClusterMode = "auto") -> None:
        super().__init__(client, cluster=cluster)
        self._prefix = check_prefix(prefix)
        self._bind()

    def _bind(self) -> None:
        self._entries = self._client.register_script(ENTRIES_LUA)
        self._drop = self._client.register_script(DROP_STALE_LUA)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(settings.redis_url, settings.cache_prefix, cluster=settings.redis_cluster)

    async def keys(self, orgs: Collection[int] = ()) -> AsyncIterator[tuple[int, bytes]]:
        """Every data key ``P:{O}:…`` of a canonical organization (of ``orgs``, if given), by SCAN."""
        client = await self._connected()  # on a cluster, scan_iter walks every primary
        with unavailable(self.url):
            async for key in client.scan_iter(match=data_key_pattern(self._prefix), count=_SCAN_COUNT):
                found = parse_data_key(self._prefix, key.encode() if isinstance(key, str) else key)
                if found is not None and (not orgs or found[0] in orgs):
                    yield found

    async def sample(self, size: int, orgs: Collection[int] = ()) -> list[tuple[int, bytes]]:
        """Up to ``size`` indexed keys drawn at random: organizations from the registry (or
        ``orgs``), then keys from their indexes.  O(size), no walk of the keyspace."""
        if size < 1:
            return []
        await self._connected()
        with unavailable(self.url):
            if orgs:
                drawn: list[int] = list(orgs)[:_SAMPLE_ORGS]
            else:
                members = await self._client.srandmember(registry_key(self._prefix), _SAMPLE_ORGS)
                drawn = []
                for member in members or ():
                    try:
                        drawn.append(parse_id(member if isinstance(member, bytes | str) else str(member)))
                    except InvalidId:
                        continue
            if not drawn:
                return []
            per_org = max(1, -(-size // len(drawn)))
            async with self._client.pipeline(transaction=False) as pipe:
                for org in drawn:
                    pipe.srandmember(index_key(self._prefix, org), per_org)
                replies = await pipe.execute()
        found: list[tuple[int, bytes]] = []
        for org, names in zip(drawn, replies, strict=True):
            for name in names or ():
                key = name.encode() if isinstance(name, str) else name
                parsed = parse_data_key(self._prefix, key)
                if parsed is not None and parsed[0] == org:  # a damaged index may name anything
                    found.append(parsed)
        return found[:size]

    async def inspect(self, org: int, keys: Sequence[bytes]) -> OrgEntries:
        """The organization's epoch and each key's state, in scripts of at most 500 keys (each
        atomic: a batch's entries are judged against the epoch of that same moment)."""
        epoch: bytes | None = None
        states: list[EntryState] = []
        for start in range(0, max(len(keys), 1), _KEYS_PER_SCRIPT):
            batch = list(keys[start : start + _KEYS_PER_SCRIPT])
            await self._connected()
            with unavailable(self.url):
                reply = await self._entries(
                    keys=[epoch_key(self._prefix, org), index_key(self._prefix, org), *batch], args=[HEADER_MAX_BYTES]
                )
            epoch = reply[0]
            for i, key in enumerate(batch):
                exists, indexed, head = reply[1 + 3 * i : 4 + 3 * i]
                found = recorded_epoch(head) if head is not None else None
                states.append(
                    EntryState(
                        key=key,
                        exists=bool(exists),
                        indexed=bool(indexed),
                        epoch=None if found is None else found[0],
                        header=None if found is None else found[1],
                    )
                )
        return OrgEntries(org, epoch, tuple(states))

    async def drop_stale(self, org: int, entries: Sequence[EntryState]) -> int:
        """Delete these entries if they are still stale (same header, epoch moved on); the number deleted."""
        stale = [entry for entry in entries if entry.header is not None and entry.epoch is not None]
        deleted = 0
        for start in range(0, len(stale), _KEYS_PER_SCRIPT):
            batch = stale[start : start + _KEYS_PER_SCRIPT]
            args: list[bytes] = []
            for entry in batch:
                args += [entry.header or b"", entry.epoch or b""]
            await self._connected()
            with unavailable(self.url):
                deleted += int(
                    await self._drop(
                        keys=[epoch_key(self._prefix, org), index_key(self._prefix, org), *(e.key for e in batch)],
                        args=args,
                    )
                )
        return deleted
