"""The timestamp forms of the wire: RFC1123, RFC1123Z and RFC3339.  No I/O here.

Accepted, and nothing else (``ValueError`` otherwise; the codec turns it into ``BadTimestamp``):

* RFC1123   ``Mon, 02 Jan 2006 15:04:05 UTC`` (or ``GMT``)
* RFC1123Z  ``Mon, 02 Jan 2006 15:04:05 -0700`` (``-0000`` is read as UTC, per RFC 5322)
* RFC3339   ``2006-01-02T15:04:05Z``, ``2006-01-02T15:04:05.999999999-07:00``

Choices, each made so that a value means exactly one instant:

* Surrounding ASCII whitespace is ignored (a trailing newline from a shell is a common slip and
  cannot change the meaning); inside, separators are exactly as shown: single spaces, no padding.
* RFC1123: the weekday may be left out (RFC 5322 makes it optional); when given it must be the
  right one for the date, because a wrong weekday means the producer built the string by hand and
  we cannot tell which half is true.  Day, month and zone names are matched case-insensitively
  (RFC 5322 says they are), in English only.  Day and hour are two digits, as Go's layouts print
  them.  Only the zones ``UTC`` and ``GMT`` are accepted by name: other abbreviations (``EST``,
  ``IST``, ``CST``) are ambiguous.  No sub-second part: RFC1123 has none.
* RFC3339: ``T``, ``t`` or a space between date and time (RFC 3339 §5.6 allows all three), ``Z``
  or ``z`` or a ``±hh:mm`` offset (``-00:00`` is UTC).  Fractional seconds may have any number of
  digits; the first six are kept and the rest truncated, which matches the microsecond resolution
  of Python and of Postgres ``timestamptz`` and, unlike rounding, never moves a value into the next
  second.
* Leap seconds (``:60``) are refused: neither Python nor Postgres can represent them.
* Only ASCII digits: ``str.isdigit`` would let other scripts' digits through.

Results are always timezone-aware and normalised to UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {name.lower(): number for number, name in enumerate(_MONTHS, start=1)}
_DAY_NUMBER = {name.lower(): number for number, name in enumerate(_DAYS)}

_RFC1123 = re.compile(
    r"(?:(?P<weekday>[A-Za-z]{3}), )?"
    r"(?P<day>[0-9]{2}) (?P<month>[A-Za-z]{3}) (?P<year>[0-9]{4}) "
    r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2}) "
    r"(?:(?P<zone>[A-Za-z]{3})|(?P<sign>[+-])(?P<off_hour>[0-9]{2})(?P<off_minute>[0-9]{2}))"
)
_RFC3339 = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})[Tt ]"
    r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]+))?"
    r"(?:(?P<zulu>[Zz])|(?P<sign>[+-])(?P<off_hour>[0-9]{2}):(?P<off_minute>[0-9]{2}))"
)
_UTC_NAMES = frozenset({"utc", "gmt"})
# Only the whitespace a shell or a text file adds; str.strip() would also eat e.g. U+3000.
_ASCII_WHITESPACE = " \t\r\n"
# Long enough for any valid form with nine fractional digits and then some; longer is garbage.
_MAX_LENGTH = 64


def parse_timestamp(text: str) -> datetime:
    """Parse one of the accepted forms (see module docstring) into an aware UTC datetime."""
    value = text.strip(_ASCII_WHITESPACE)
    if len(value) > _MAX_LENGTH:
        raise ValueError(f"not a timestamp: {len(value)} characters is too long")
    if match := _RFC3339.fullmatch(value):
        if match["zulu"]:
            try:
                # UTC within the grammar just checked: the C parser gives the same instant several
                # times faster (the live path parses two timestamps an event).  Offsets take the
                # slow path, as fromisoformat takes minutes beyond 59; what it refuses, such as a
                # leap second, is parsed again below for the precise reason.
                return _utc(datetime.fromisoformat(value))
            except ValueError:
                pass
        return _from_rfc3339(match)
    if match := _RFC1123.fullmatch(value):
        return _from_rfc1123(match)
    raise ValueError(f"not an RFC1123, RFC1123Z or RFC3339 timestamp: {value!r}")


def format_rfc1123z(moment: datetime) -> str:
    """``Mon, 02 Jan 2006 15:04:05 +0000``, in UTC; sub-second precision is dropped (RFC1123 has none)."""
    return f"{_rfc1123_clock(_to_utc(moment))} +0000"


def format_rfc1123(moment: datetime) -> str:
    """``Mon, 02 Jan 2006 15:04:05 UTC``: Go's ``time.RFC1123`` of a UTC time; sub-seconds dropped."""
    return f"{_rfc1123_clock(_to_utc(moment))} UTC"


def format_rfc3339(moment: datetime) -> str:
    """``2006-01-02T15:04:05Z`` or ``2006-01-02T15:04:05.123456Z``: UTC, microseconds when non-zero."""
    utc = _to_utc(moment)
    fraction = f".{utc.microsecond:06d}" if utc.microsecond else ""
    return f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{_clock(utc)}{fraction}Z"


def _to_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("a timestamp on the wire needs a timezone-aware datetime")
    return moment.astimezone(UTC)


# Fields are formatted by hand rather than with strftime: %a/%b follow the locale, and %Y does not
# pad years before 1000 on every platform.
def _rfc1123_clock(utc: datetime) -> str:
    return f"{_DAYS[utc.weekday()]}, {utc.day:02d} {_MONTHS[utc.month - 1]} {utc.year:04d} {_clock(utc)}"


def _clock(utc: datetime) -> str:
    return f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}"


def _from_rfc3339(match: re.Match[str]) -> datetime:
    fraction = match["fraction"] or ""
    microsecond = int(fraction[:6].ljust(6, "0")) if fraction else 0
    offset = timedelta(0) if match["zulu"] else _offset(match["sign"], match["off_hour"], match["off_minute"])
    local = _local(int(match["year"]), int(match["month"]), int(match["day"]), match, microsecond, offset)
    return _utc(local)


def _from_rfc1123(match: re.Match[str]) -> datetime:
    month = _MONTH_NUMBER.get(match["month"].lower())
    if month is None:
        raise ValueError(f"unknown month name {match['month']!r}")
    zone = match["zone"]
    if zone is not None:
        if zone.lower() not in _UTC_NAMES:
            raise ValueError(f"ambiguous zone name {zone!r}: use UTC, GMT or a numeric offset")
        offset = timedelta(0)
    else:
        offset = _offset(match["sign"], match["off_hour"], match["off_minute"])
    local = _local(int(match["year"]), month, int(match["day"]), match, 0, offset)
    weekday = match["weekday"]
    if weekday is not None:
        named = _DAY_NUMBER.get(weekday.lower())
        if named is None:
            raise ValueError(f"unknown weekday name {weekday!r}")
        if named != local.weekday():  # the weekday names the local date, not the UTC one
            raise ValueError(f"{weekday!r} does not match the date, a {_DAYS[local.weekday()]}")
    return _utc(local)


def _offset(sign: str, hours: str, minutes: str) -> timedelta:
    if int(hours) > 23 or int(minutes) > 59:
        raise ValueError(f"UTC offset out of range: {sign}{hours}{minutes}")
    magnitude = timedelta(hours=int(hours), minutes=int(minutes))
    return -magnitude if sign == "-" else magnitude


def _local(year: int, month: int, day: int, clock: re.Match[str], microsecond: int, offset: timedelta) -> datetime:
    hour, minute, second = int(clock["hour"]), int(clock["minute"]), int(clock["second"])
    if second == 60:
        raise ValueError("leap seconds are not supported")
    try:
        return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=timezone(offset) if offset else UTC)
    except ValueError as exc:  # 31 April, hour 24, year 0000...
        raise ValueError(f"not a valid date and time: {exc}") from None


def _utc(local: datetime) -> datetime:
    if local.tzinfo is UTC:
        return local
    try:
        return local.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError("out of the supported range of years 1-9999 once converted to UTC") from None
