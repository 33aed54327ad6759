"""Passwords out of everything a person or a log pipeline reads.  No I/O here.

``mask_url`` for a URL we name in a message; ``scrub`` for text that came from elsewhere (a
library's error message, an exception) and may quote a URL or its password.  Both are the only
masking in the package: every error, log line and status page goes through one of them.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

_SECRET_PARAMETERS = ("password", "sslpassword")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
MASK = "***"


def mask_url(url: str) -> str:
    """The URL with any password (user-info or ``?password=``) replaced by ``***``.

    Several URLs separated by commas (the nodes of a cluster) are masked one by one."""
    if "," in url:
        return ",".join(mask_url(part) for part in url.split(","))
    try:
        parts = urlsplit(url)
        password = parts.password
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    query = "&".join(
        f"{name}={MASK}" if name.lower() in _SECRET_PARAMETERS else (f"{name}={value}" if sep else name)
        for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    netloc = parts.netloc
    if password is not None:
        host = parts.hostname or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:{MASK}@{host}"
        if port is not None:
            netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def secrets_of(url: str) -> set[str]:
    """The passwords a URL carries, as written and percent-decoded."""
    found: set[str] = set()
    for part in url.split(","):
        try:
            parts = urlsplit(part)
            password = parts.password
        except ValueError:
            continue
        if password:
            found |= {password, unquote(password)}
        found |= {value for name, value in parse_qsl(parts.query) if name.lower() in _SECRET_PARAMETERS and value}
    return found


def scrub(text: str, *urls: str) -> str:
    """``text`` with every URL in it masked and every password of ``urls`` replaced, wherever
    it stands (libpq, for one, quotes connection parameters without their URL)."""
    masked = _URL_IN_TEXT.sub(lambda match: mask_url(match.group(0)), text)
    for secret in sorted({s for url in urls for s in secrets_of(url)}, key=len, reverse=True):
        masked = masked.replace(secret, MASK)
    return masked
