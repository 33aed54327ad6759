"""Mention and organization ids: positive int64, written in canonical decimal.  No I/O here.

One parser for every place an id arrives as text (the wire's ``Core.organization_id``, a command's
``--org``, a Redis key name or registry member) and one check for ids that arrive as numbers, so
``007``, ``0``, ``+7`` or ``٧`` mean the same everywhere: nothing.  Canonical form matters beyond
taste: an id becomes part of a Redis key, and two spellings of one organization would be two
namespaces.  In protobuf 0 means "not set", so 0 is never an id.
"""

from __future__ import annotations

import re

MAX_ID = 2**63 - 1  # bigint, the read model's column type
# No sign, no leading zero, ASCII digits only (``\d`` admits other scripts' digits).
_CANONICAL = re.compile(r"[1-9][0-9]{0,18}")


class InvalidId(ValueError):
    """Text or a number that is not a positive int64 id in canonical decimal."""

    def __init__(self, what: str, value: object) -> None:
        self.what = what
        self.value = value
        super().__init__(f"must be a decimal {what} from 1 to 2^63-1, without sign or leading zeros, got {value!r}")


def parse_id(text: str | bytes, what: str = "organization id") -> int:
    """The id written as ``text``; ``InvalidId`` unless it is canonical decimal and in range."""
    value = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    if not isinstance(value, str) or _CANONICAL.fullmatch(value) is None or int(value) > MAX_ID:
        raise InvalidId(what, text)
    return int(value)


def check_id(value: int, what: str = "organization id") -> int:
    """``value`` if it is an int id in range; ``TypeError`` for a non-int (bool included)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if not 0 < value <= MAX_ID:
        raise InvalidId(what, value)
    return value


def check_organization_id(value: int) -> int:
    return check_id(value, "organization id")
