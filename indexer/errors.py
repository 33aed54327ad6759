"""Errors keyed by what the caller must do about them.

* ``Refused``: the message itself is unusable; retrying cannot help.  Dead-letter it with
  ``reason`` in the ``x-indexer-error`` header and move on.
* ``Transient`` (``Unavailable``, ``Conflict``): retry with backoff, acknowledge nothing meanwhile.
* ``ConfigError``: the operator must fix an option or variable; the command exits 2.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


_SECRET_PARAMETERS = ("password", "sslpassword")


def mask_url(url: str) -> str:
    """The URL with any password (user-info or ``?password=``) replaced by ``***``, for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    query = "&".join(
        f"{name}=***" if name.lower() in _SECRET_PARAMETERS else (f"{name}={value}" if sep else name)
        for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class IndexerError(Exception):
    """Base of every error this package raises on purpose."""


class Refused(IndexerError):
    """A message that cannot be used; it goes to the dead-letter queue with ``reason``."""

    def __init__(self, reason: str) -> None:
        # Header values must stay one short line whatever the input was.
        self.reason = " ".join(reason.split())[:500]
        super().__init__(self.reason)


class Undecodable(Refused):
    """The body is not a VtEvent in any accepted form."""


class MissingField(Refused):
    """A field the change cannot do without is absent."""

    def __init__(self, field: str) -> None:
        self.field = field
        super().__init__(f"missing {field}")


class BadTimestamp(Refused):
    """A timestamp in none of the accepted forms (RFC1123, RFC1123Z, RFC3339)."""

    def __init__(self, field: str, value: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"unparseable {field}: {value!r}")


class BadOrganizationId(Refused):
    """An organization id that is not a decimal integer."""

    def __init__(self, value: str) -> None:
        self.value = value
        super().__init__(f"organization_id is not a decimal integer: {value!r}")


class OutOfRange(Refused):
    """A number present but outside its domain, e.g. a negative mention_id."""

    def __init__(self, field: str, value: int, expected: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field} out of range: {value} (must be {expected})")


class TooLarge(Refused):
    """A body over the configured size limit."""

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
