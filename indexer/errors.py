"""Errors keyed by what the caller must do about them.

* ``Refused``: the message itself is unusable; retrying cannot help.  Dead-letter it with
  ``reason`` in the ``x-indexer-error`` header and move on.
* ``Transient`` (``Unavailable``, ``Conflict``): retry with backoff, acknowledge nothing meanwhile.
* ``ConfigError``: the operator must fix an option or variable; the command exits 2.
"""

from __future__ import annotations

from indexer.redact import mask_url


class IndexerError(Exception):
    """Base of every error this package raises on purpose."""


class Refused(IndexerError):
    """A message that cannot be used; it goes to the dead-letter queue with ``reason``.

    ``kind`` is the class of reason, one of a small fixed set (a metric label)."""

    kind = "unusable"

    def __init__(self, reason: str) -> None:
        # Header values must stay one short line whatever the input was.
        self.reason = " ".join(reason.split())[:500]
        self.event_id = ""  # the envelope's Core.id, where it could be read
        super().__init__(self.reason)


class Undecodable(Refused):
    """The body is not a VtEvent in any accepted form."""

    kind = "undecodable"


class MissingField(Refused):
    """A field the change cannot do without is absent."""

    kind = "missing_field"

    def __init__(self, field: str) -> None:
        self.field = field
        super().__init__(f"missing {field}")


class BadTimestamp(Refused):
    """A timestamp in none of the accepted forms (RFC1123, RFC1123Z, RFC3339)."""

    kind = "bad_timestamp"

    def __init__(self, field: str, value: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"unparseable {field}: {value!r}")


class BadOrganizationId(Refused):
    """An organization id that is not a decimal integer."""

    kind = "bad_organization_id"

    def __init__(self, value: str) -> None:
        self.value = value
        super().__init__(f"organization_id is not a decimal integer: {value!r}")


class OutOfRange(Refused):
    """A number present but outside its domain, e.g. a negative mention_id."""

    kind = "out_of_range"

    def __init__(self, field: str, value: int, expected: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field} out of range: {value} (must be {expected})")


class TooLarge(Refused):
    """A body over the configured size limit."""

    kind = "too_large"

    def __init__(self, size_bytes: int, limit_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes
        super().__init__(f"body of {size_bytes} bytes is over the limit of {limit_bytes} bytes")


class Transient(IndexerError):
    """Worth retrying with backoff; nothing of the batch in hand may be acknowledged meanwhile."""


class Conflict(Transient):
    """Postgres aborted the transaction (serialization failure, deadlock); simply run it again."""


class Unavailable(Transient):
    """A service could not be reached or failed transiently; retry later, acknowledge nothing."""

    def __init__(self, service: str, url: str, detail: str = "") -> None:
        self.service = service
        self.url = mask_url(url)
        self.detail = detail
        message = f"{service} unavailable at {self.url}"
        super().__init__(f"{message}: {detail}" if detail else message)


class ConfigError(IndexerError):
    """A bad option or variable; the message says what to fix.  Exit status 2."""
