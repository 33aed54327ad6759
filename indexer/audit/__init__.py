"""The audit (docs/audit.md): does the read model agree with the source, and do the caches agree
with the read model?  Repair what does not.

* ``mentions``: the source against the read model, by checksums of id ranges, descending only
  into ranges that differ; or a random sample of windows of ids.  Source rows newer than the read
  model's watermark, and differences gone when read again, are in flight, never differences.
* ``caches``: every entry filled through the helper must carry its organization's current epoch;
  one that carries an older epoch outlived an invalidation (stale).
* ``repair``: every difference back through the version guard (the live path's statement), the
  extras tombstoned, the stale entries dropped, the organizations concerned invalidated.
* ``run``: one audit (and repair) of a scope, for ``mention-indexer audit`` (``indexer.ops.audit``).
* ``continuous``: the sample the service checks every ``INDEXER_AUDIT_INTERVAL_S``, into metrics.

It reads Postgres through ``indexer.readmodel`` (``source``, ``checksums``) and Redis through
``indexer.cache`` (``entries``), and writes only through ``Store.apply`` and the invalidator.
"""

from indexer.audit.continuous import ContinuousAudit
from indexer.audit.model import CacheCounts, Difference, MentionCounts, Report, StaleEntry
from indexer.audit.repair import Repair
from indexer.audit.run import Options, audit, audit_and_repair, audit_with

__all__ = [
    "CacheCounts",
    "ContinuousAudit",
    "Difference",
    "MentionCounts",
    "Options",
    "Repair",
    "Report",
    "StaleEntry",
    "audit",
    "audit_and_repair",
    "audit_with",
]
