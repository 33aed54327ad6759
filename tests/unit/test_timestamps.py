"""The timestamp forms a change may carry (RFC1123, RFC1123Z, RFC3339): what is accepted, what it
means, and that formatting round-trips."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from indexer.timestamps import format_rfc1123, format_rfc1123z, format_rfc3339, parse_timestamp
from tests.support.clock import UTC, utc

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # RFC1123, both zone names, any case
        ("Mon, 02 Jan 2006 15:04:05 UTC", utc(2006, 1, 2, 15, 4, 5)),
        ("Mon, 02 Jan 2006 15:04:05 GMT", utc(2006, 1, 2, 15, 4, 5)),
        ("mon, 02 JAN 2006 15:04:05 gmt", utc(2006, 1, 2, 15, 4, 5)),
        ("02 Jan 2006 15:04:05 UTC", utc(2006, 1, 2, 15, 4, 5)),  # weekday is optional
        # RFC1123Z
        ("Mon, 02 Jan 2006 15:04:05 -0700", utc(2006, 1, 2, 22, 4, 5)),
        ("Mon, 02 Jan 2006 15:04:05 +0000", utc(2006, 1, 2, 15, 4, 5)),
        ("Mon, 02 Jan 2006 15:04:05 -0000", utc(2006, 1, 2, 15, 4, 5)),
        ("Tue, 03 Jan 2006 01:04:05 +0530", utc(2006, 1, 2, 19, 34, 5)),  # weekday of the local date
        ("Sat, 31 Dec 2005 23:59:59 -2359", utc(2006, 1, 1, 23, 58, 59)),
        # RFC3339
        ("2006-01-02T15:04:05Z", utc(2006, 1, 2, 15, 4, 5)),
        ("2006-01-02t15:04:05z", utc(2006, 1, 2, 15, 4, 5)),
        ("2006-01-02 15:04:05Z", utc(2006, 1, 2, 15, 4, 5)),
        ("2006-01-02T15:04:05-07:00", utc(2006, 1, 2, 22, 4, 5)),
        ("2006-01-02T15:04:05+05:30", utc(2006, 1, 2, 9, 34, 5)),
        ("2006-01-02T15:04:05-00:00", utc(2006, 1, 2, 15, 4, 5)),
        ("2006-01-02T15:04:05.5Z", utc(2006, 1, 2, 15, 4, 5, 500000)),
        ("2006-01-02T15:04:05.000001Z", utc(2006, 1, 2, 15, 4, 5, 1)),
        ("2006-01-02T15:04:05.123456789Z", utc(2006, 1, 2, 15, 4, 5, 123456)),  # truncated, not rounded
        ("2006-01-02T23:59:59.9999999Z", utc(2006, 1, 2, 23, 59, 59, 999999)),
        # surrounding ASCII whitespace
        ("  2006-01-02T15:04:05Z\n", utc(2006, 1, 2, 15, 4, 5)),
        ("\tMon, 02 Jan 2006 15:04:05 UTC\r\n", utc(2006, 1, 2, 15, 4, 5)),
    ],
)
def test_accepted_forms(text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "garbage",
        "2006-01-02",  # a date alone
        "15:04:05",
        "2006-01-02T15:04:05",  # no offset: ambiguous
        "2006-01-02T15:04Z",  # no seconds
        "2006-01-02T15:04:05.Z",  # empty fraction
        "2006-01-02T15:04:05+0700",  # RFC3339 offsets have a colon
        "2006-01-02T15:04:05+07",
        "2006-01-02T15:04:05 Z",
        "2006-1-2T15:04:05Z",
        "06-01-02T15:04:05Z",
        "2006-01-02T15:04:05+24:00",
        "2006-01-02T15:04:05+07:60",
        "2006-02-30T15:04:05Z",  # no such day
        "2006-13-02T15:04:05Z",
        "2006-01-02T24:00:00Z",
        "2006-01-02T23:59:60Z",  # leap second
        "0000-01-01T00:00:00Z",
        "0001-01-01T00:00:00+00:01",  # before year 1 in UTC
        "9999-12-31T23:59:59-00:01",  # after year 9999 in UTC
        "2006-01-02T15:04:05Z junk",
        "2006-01-02T15:04:05ZZ",
        "２００６-01-02T15:04:05Z",  # non-ASCII digits
        "2006-01-02T15:04:05.١٢Z",
        "Mon, 02 Jan 2006 15:04:05 MST",  # ambiguous zone names
        "Mon, 02 Jan 2006 15:04:05 EST",
        "Mon, 02 Jan 2006 15:04:05 Z",
        "Mon, 02 Jan 2006 15:04:05",  # no zone
        "Mon, 02 Jan 2006 15:04:05 +07:00",  # RFC1123Z offsets have no colon
        "Mon, 02 Jan 2006 15:04:05 +070",
        "Mon, 02 Jan 2006 15:04:05 +2400",
        "Mon, 02 Jan 2006 15:04:05.123 UTC",  # RFC1123 has no sub-second part
        "Mon, 2 Jan 2006 15:04:05 UTC",  # two-digit day, as Go prints it
        "Mon, 02 Jan 06 15:04:05 UTC",  # two-digit year (RFC 822)
        "Mon, 02 Jan 2006 15:04 UTC",
        "Mon 02 Jan 2006 15:04:05 UTC",
        "Mon,  02 Jan 2006 15:04:05 UTC",
        "Monday, 02 Jan 2006 15:04:05 UTC",
        "Mon, 02 January 2006 15:04:05 UTC",
        "Tue, 02 Jan 2006 15:04:05 UTC",  # wrong weekday
        "Mon, 03 Jan 2006 01:04:05 +0530",  # weekday of the UTC date, not the local one
        "Xyz, 02 Jan 2006 15:04:05 UTC",
        "Mon, 02 Foo 2006 15:04:05 UTC",
        "Mon, 30 Feb 2006 15:04:05 UTC",
        "Lun, 02 Janv 2006 15:04:05 UTC",
        "Mon, 02 Jan 2006 15:04:05 UTC\x00",
        "\u30002006-01-02T15:04:05Z",  # only ASCII whitespace is trimmed
        "2006-01-02T15:04:05." + "1" * 100 + "Z",  # absurdly long
        "1136214245",  # unix seconds
    ],
)
def test_rejected_forms(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(text)


def test_error_message_names_the_value() -> None:
    with pytest.raises(ValueError, match="'yesterday'"):
        parse_timestamp("yesterday")


def test_formats() -> None:
    moment = datetime(2006, 1, 2, 15, 4, 5, 120, tzinfo=timezone(timedelta(hours=-7)))
    assert format_rfc1123z(moment) == "Mon, 02 Jan 2006 22:04:05 +0000"
    assert format_rfc1123(moment) == "Mon, 02 Jan 2006 22:04:05 UTC"
    assert format_rfc3339(moment) == "2006-01-02T22:04:05.000120Z"
    assert format_rfc3339(moment.replace(microsecond=0)) == "2006-01-02T22:04:05Z"


def test_formats_pad_early_years() -> None:
    moment = utc(5, 3, 4, 1, 2, 3)
    assert format_rfc3339(moment) == "0005-03-04T01:02:03Z"
    assert format_rfc1123z(moment) == f"{DAYS[moment.weekday()]}, 04 Mar 0005 01:02:03 +0000"


@pytest.mark.parametrize("formatter", [format_rfc1123z, format_rfc1123, format_rfc3339])
def test_formats_refuse_naive_datetimes(formatter: object) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        formatter(datetime(2006, 1, 2))  # type: ignore[operator]


# Whole-minute offsets (what the forms can express), strictly within ±24 h.
offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
# Years kept off the edges so that any offset stays representable once converted to UTC.
aware = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=offsets)


def _offset_text(moment: datetime, colon: bool) -> str:
    offset = moment.utcoffset()
    assert offset is not None
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}{':' if colon else ''}{minutes:02d}"


def _whole_seconds(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


@given(aware)
def test_rfc3339_round_trip_keeps_microseconds(moment: datetime) -> None:
    parsed = parse_timestamp(format_rfc3339(moment))
    assert parsed == moment
    assert parsed.tzinfo is UTC


@given(aware)
def test_rfc1123_round_trips_drop_only_the_fraction(moment: datetime) -> None:
    assert parse_timestamp(format_rfc1123z(moment)) == _whole_seconds(moment)
    assert parse_timestamp(format_rfc1123(moment)) == _whole_seconds(moment)


@given(aware)
def test_local_offsets_are_honoured(moment: datetime) -> None:
    """Strings written in the datetime's own offset, as other producers would, mean the same instant."""
    local_rfc1123z = (
        f"{DAYS[moment.weekday()]}, {moment.day:02d} {MONTHS[moment.month - 1]} {moment.year:04d} "
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {_offset_text(moment, colon=False)}"
    )
    local_rfc3339 = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{moment.microsecond:06d}987"
        f"{_offset_text(moment, colon=True)}"
    )
    assert parse_timestamp(local_rfc1123z) == _whole_seconds(moment)
    assert parse_timestamp(local_rfc3339) == moment  # digits past the sixth are truncated


@given(aware, aware)
def test_formatting_preserves_order(a: datetime, b: datetime) -> None:
    if a < b:
        assert parse_timestamp(format_rfc3339(a)) < parse_timestamp(format_rfc3339(b))


@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_raises_value_error(text: str) -> None:
    try:
        parsed = parse_timestamp(text)
    except ValueError:
        return
    assert parsed.tzinfo is UTC


_RFC3339_SHAPED = st.from_regex(
    r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,12})?([Zz]|[+-][0-9]{2}:[0-9]{2})\Z"
)


@given(st.one_of(_RFC3339_SHAPED, aware.map(format_rfc3339)))
def test_the_fast_rfc3339_path_agrees_with_the_grammar(text: str) -> None:
    """Whatever the C parser accepts inside the grammar gives the instant the grammar's own reading gives."""
    from indexer.timestamps import _RFC3339, _from_rfc3339

    match = _RFC3339.fullmatch(text)
    assert match is not None
    try:
        expected: datetime | str = _from_rfc3339(match)
    except ValueError as exc:
        expected = str(exc)
    try:
        got: datetime | str = parse_timestamp(text)
    except ValueError as exc:
        got = str(exc)
    assert got == expected
    if isinstance(got, datetime):
        assert got.tzinfo is UTC
