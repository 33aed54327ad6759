"""The key layout of one prefix's caches (see the package doc).  Pure: no Redis here.

Every name is built from a checked prefix and a checked organization id, so no caller can make a
key outside ``P:{O}:`` or a glob out of an id.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from indexer.ids import InvalidId, check_organization_id, parse_id

# Characters that would turn a prefix into a glob or move the {org} hash tag; the settings refuse
# the same ones for INDEXER_CACHE_PREFIX.
PREFIX_FORBIDDEN = frozenset("{}*?[]\\ \t\r\n")
MAX_KEY_BYTES = 1024


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix or PREFIX_FORBIDDEN & set(prefix):
        raise ValueError(f"cache prefix must be non-empty, without braces, globs or spaces: {prefix!r}")
    return prefix


def check_key(key: str) -> str:
    """A key is the part after ``P:{O}:``; any printable text, the helper adds the rest."""
    if not isinstance(key, str):
        raise TypeError(f"cache key must be a str, got {type(key).__name__}")
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"cache key must be 1 to {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError(f"cache key contains a control character: {key!r}")
    return key


def namespace(prefix: str, org: int) -> str:
    """``P:{O}:``, the start of every cached key of ``org``."""
    return f"{check_prefix(prefix)}:{{{check_organization_id(org)}}}:"


def data_key(prefix: str, org: int, key: str) -> str:
    return namespace(prefix, org) + check_key(key)


def index_key(prefix: str, org: int) -> str:
    return f"{check_prefix(prefix)}:idx:{{{check_organization_id(org)}}}"


def epoch_key(prefix: str, org: int) -> str:
    return f"{check_prefix(prefix)}:epoch:{{{check_organization_id(org)}}}"


def registry_key(prefix: str) -> str:
    return f"{check_prefix(prefix)}:orgs"


def glob_escape(text: str) -> str:
    return re.sub(r"[\\*?\[\]]", lambda m: "\\" + m.group(), text)


def data_key_pattern(prefix: str) -> str:
    """The glob of every key ``P:{…}:…`` (and nothing of another prefix): what the key tracker
    subscribes to and the one SCAN that adopts or audits keys walks."""
    return glob_escape(f"{check_prefix(prefix)}:{{") + "*"


def parse_data_key(prefix: str, key: bytes) -> tuple[int, bytes] | None:
    """``(org, key)`` for ``P:{<canonical decimal org>}:<anything>``; None for anything else."""
    head = f"{check_prefix(prefix)}:{{".encode()
    if not key.startswith(head):
        return None
    digits, tag_end, _ = key[len(head) :].partition(b"}:")
    if not tag_end:
        return None
    try:
        return parse_id(digits), key
    except InvalidId:
        return None


# A value filled through the helper is stored as ENTRY_MAGIC, the epoch it was filled under
# (decimal), a NUL, then the value itself: so a read can tell it from a key written directly (kept
# as it is, and served as it is) and refuse one filled under another epoch than the current one,
# e.g. restored by a failover after its invalidation.  Nothing but the helper writes the magic.
# scripts/fill.lua builds the header itself, from the epoch it checks (tests/test_cache_epochs.py
# holds the two together).
ENTRY_MAGIC = b"\x00MI1\x00"
_SEPARATOR = b"\x00"
HEADER_MAX_BYTES = len(ENTRY_MAGIC) + 20 + len(_SEPARATOR)  # an epoch is a positive int64


def entry_header(epoch: bytes | str) -> bytes:
    """What a value filled under ``epoch`` is stored behind."""
    raw = epoch.encode() if isinstance(epoch, str) else bytes(epoch)
    if not raw.isdigit():
        raise ValueError(f"an epoch is a decimal number, got {raw!r}")
    return ENTRY_MAGIC + raw + _SEPARATOR


def recorded_epoch(stored: bytes) -> tuple[bytes, bytes] | None:
    """``(epoch, header)`` of a value filled through the helper (``stored`` may be just its first
    ``HEADER_MAX_BYTES`` bytes); None for a value written without it."""
    if not stored.startswith(ENTRY_MAGIC):
        return None
    end = stored.find(_SEPARATOR, len(ENTRY_MAGIC))
    epoch = stored[len(ENTRY_MAGIC) : end]
    if end < 0 or not epoch.isdigit():
        return None
    return epoch, stored[: end + 1]


def stored_value(stored: bytes) -> bytes:
    """The value itself: behind the header of a helper-filled value, or all of a direct one."""
    found = recorded_epoch(stored)
    return stored if found is None else stored[len(found[1]) :]


def servable(stored: bytes, epoch: bytes) -> bytes | None:
    """What a read may return of ``stored`` while the organization's epoch is ``epoch``: the
    value; None for a value filled under another epoch (stale: it outlived an invalidation)."""
    found = recorded_epoch(stored)
    if found is None:
        return stored  # written directly: its freshness is its writer's affair (docs/caches.md)
    return stored[len(found[1]) :] if found[0] == epoch else None


def fresh_epoch() -> str:
    # Random start (package doc, eviction); 2^62 leaves INCR room before int64 overflow.
    return str(secrets.randbelow(2**62) + 1)


def ttl_ms(ttl_s: float) -> int:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0 <= ttl_s < math.inf:
        raise ValueError(f"ttl_s must be a finite number >= 0 (0 = no expiry), got {ttl_s!r}")
    return math.ceil(ttl_s * 1000)


def as_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a cache loader must return bytes or str, got {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class Entry:
    """The keys one get_or_fill call works on; building it validates the arguments."""

    registry: str
    org: int
    slot_keys: tuple[str, str, str]  # epoch, index, data: one slot
    ttl_ms: int

    @classmethod
    def of(cls, prefix: str, org: int, key: str, ttl_s: float) -> Entry:
        keys = (epoch_key(prefix, org), index_key(prefix, org), data_key(prefix, org, key))
        return cls(registry_key(prefix), org, keys, ttl_ms(ttl_s))
