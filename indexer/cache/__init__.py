"""Per-organization Redis caches: key layout (``keys``), the reader-side helper (``reader``), the
invalidator (``invalidator``) and the tracker of keys written directly (``tracker``).

Key layout, for prefix ``P`` and organization ``O`` (decimal):

=====================  ===================================================================
``P:{O}:<key>``        a cached value; written through ``get_or_fill``, or directly by others
``P:idx:{O}``          set of the full names of O's cached keys: what invalidation deletes
``P:epoch:{O}``        O's epoch: moved on by every invalidation; a fill stores only if it
                       is unchanged since before the value was loaded
``P:orgs``             set of organization ids that may have cached keys (``invalidate_all``)
=====================  ===================================================================

The ``{O}`` hash tag puts an organization's data, index and epoch in one Redis Cluster slot, so
each Lua script touches one slot; the registry is in a slot of its own and written by separate
calls.  Invalidation deletes the members of one index: O(that organization's keys), never a
SCAN or KEYS of the keyspace, and never a key outside ``P:{O}:``.

Keys written into ``P:{O}:`` without this helper (a plain SET by another service) are indexed too,
by the invalidator's key tracker (``tracker``: keyspace notifications, plus one SCAN of
``P:{*`` when it starts or reconnects, in a task of its own, never per event nor inside an
invalidation), and each invalidation first waits until every key created before it is indexed.
Where the server does not allow that (``INDEXER_TRACK_DIRECT_KEYS``), only keys written through the
helper are deleted.

Why a read can never return data older than an acknowledged commit C (the indexer runs: commit C,
then ``invalidate``, then ack):

* ``invalidate`` atomically deletes every indexed key and moves the epoch on.
* ``get_or_fill`` reads the epoch and the value in one atomic step, and serves a value only if its
  key is in the index.  On a miss it loads from the database, then a fill script stores the value
  only if the epoch is still the one read before loading.
* A value served after the invalidation was therefore stored after it (anything stored before
  was deleted), by a fill whose epoch is the post-invalidation one, so its loading started after
  the invalidation, hence after C.  A value returned on a miss was loaded after the read began.
  (A key written directly is served once the tracker has indexed it: it too was written after
  the invalidation, but its freshness is its writer's affair, not guarded by the epoch.)

Eviction: epochs start at a random value, so an evicted and re-created epoch never matches one an
in-flight fill holds; a value whose index was evicted is not served.  Only ``invalidate_all`` relies
on a key surviving eviction (the registry); run the cache with ``noeviction`` or a ``volatile-*``
policy for that guarantee.

Each entry records the epoch it was filled under: the helper stores ``keys.ENTRY_MAGIC``, the
epoch and a NUL in front of the value, and serves an entry only while that epoch is still the
organization's.  An entry that came back after its invalidation (restored by a failover, a
``RESTORE`` of an old dump) carries an older epoch: it is never served, and the audit reports it
stale (``entries``, docs/audit.md).  Keys written directly stay as they were written and are
served as they are; they record no epoch, so the audit counts them as unverifiable.

Values are bytes: a loader may return ``str`` (stored UTF-8 encoded), and every value comes back
as ``bytes``.  Clients passed in must use ``decode_responses=False``.
"""

from indexer.cache.entries import CacheInspector, EntryState, OrgEntries
from indexer.cache.errors import is_transient, reply_code
from indexer.cache.invalidator import CacheInvalidator
from indexer.cache.keys import (
    check_key,
    check_prefix,
    data_key,
    entry_header,
    epoch_key,
    index_key,
    namespace,
    recorded_epoch,
    registry_key,
    stored_value,
)
from indexer.cache.reader import AsyncCacheReader, CacheReader
from indexer.cache.scripts import FILL_LUA, INVALIDATE_LUA, READ_LUA, TRACK_LUA
from indexer.cache.tracker import KeyTracker, TrackMode

__all__ = [
    "FILL_LUA",
    "INVALIDATE_LUA",
    "READ_LUA",
    "TRACK_LUA",
    "AsyncCacheReader",
    "CacheInspector",
    "CacheInvalidator",
    "CacheReader",
    "EntryState",
    "KeyTracker",
    "OrgEntries",
    "TrackMode",
    "check_key",
    "check_prefix",
    "data_key",
    "entry_header",
    "epoch_key",
    "index_key",
    "is_transient",
    "namespace",
    "recorded_epoch",
    "registry_key",
    "reply_code",
    "stored_value",
]
