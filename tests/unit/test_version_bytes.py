"""``version_bytes`` orders exactly like ``version_key``: the store compares the bytes, the
specification is the tuple."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from indexer.changes import Change, Kind, version_bytes, version_key

UTC = timezone.utc
INT64_MAX = 2**63 - 1

# The whole datetime range (negative µs since the epoch included), in any offset, plus a few
# nearby instants so that equal and adjacent timestamps are common.
offsets = st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-7))])
anywhere = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
nearby = st.integers(-2, 2).map(lambda us: datetime(2024, 1, 1, tzinfo=UTC) + timedelta(microseconds=us))
instants = st.builds(lambda instant, tz: instant.astimezone(tz), anywhere | nearby, offsets)
# None, 0 (protobuf's "not set") and the int64 extremes next to small collisions.
organizations = st.none() | st.sampled_from([0, 1, 2, INT64_MAX]) | st.integers(0, INT64_MAX)
dates = st.none() | st.just(datetime.min.replace(tzinfo=UTC)) | instants


@st.composite
def changes(draw: st.DrawFn) -> Change:
    kind = draw(st.sampled_from(list(Kind)))
    organization = draw(organizations)
    if organization is None and kind is not Kind.DELETED:
        organization = 1
    return Change(kind, 1, organization, draw(dates), draw(instants))


def sign(x: object, y: object) -> int:
    return (x > y) - (x < y)  # type: ignore[operator]


@given(changes(), changes())
@example(  # same instant written in two offsets: equal versions
    Change(Kind.UPDATED, 1, 5, None, datetime(2024, 1, 1, 12, tzinfo=UTC)),
    Change(Kind.UPDATED, 1, 5, None, datetime(2024, 1, 1, 17, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))),
)
def test_bytes_order_is_version_key_order(a: Change, b: Change) -> None:
    assert sign(version_bytes(a), version_bytes(b)) == sign(version_key(a), version_key(b))


@given(changes())
def test_fixed_width(change: Change) -> None:
    assert len(version_bytes(change)) == 26


def test_missing_organization_ranks_below_every_real_one() -> None:
    at = datetime(2024, 1, 1, tzinfo=UTC)
    without = Change(Kind.DELETED, 1, None, None, at)
    assert version_bytes(without) < version_bytes(Change(Kind.DELETED, 1, 0, None, at))


def test_organization_beyond_int64_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        version_bytes(Change(Kind.INSERTED, 1, 2**63, None, datetime(2024, 1, 1, tzinfo=UTC)))
