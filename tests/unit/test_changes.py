"""The version order of changes (timestamp, then kind, organization and date) and batch
coalescing, as properties over generated changes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from indexer.changes import Change, Kind, coalesce, supersedes, touched_organizations, version_key
from tests.support.clock import T0, UTC

# Few distinct values so that equal timestamps, kinds and contents actually collide.
instants = st.integers(min_value=0, max_value=4).map(lambda n: T0 + timedelta(microseconds=n))
# The same instant written in another offset must compare equal.
offsets = st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-7))])
timestamps = st.builds(lambda instant, tz: instant.astimezone(tz), instants, offsets)
dates = st.none() | st.sampled_from([T0 - timedelta(days=1), T0 - timedelta(days=2)])


@st.composite
def changes(draw: st.DrawFn, mention_ids: st.SearchStrategy[int] = st.integers(1, 3)) -> Change:
    kind = draw(st.sampled_from(list(Kind)))
    organizations = st.integers(1, 3)
    organization_id = draw(organizations | st.none() if kind is Kind.DELETED else organizations)
    return Change(
        kind=kind,
        mention_id=draw(mention_ids),
        organization_id=organization_id,
        mention_date=draw(dates),
        transaction_timestamp=draw(timestamps),
        event_id=draw(st.sampled_from(["e1", "e2"])),
    )


def stored(change: Change | None) -> tuple[object, ...] | None:
    """What the read model keeps of a change: everything but the event's identity and trace."""
    if change is None:
        return None
    return (change.mention_id, change.kind, change.organization_id, change.mention_date, change.transaction_timestamp)


def apply_in_order(table: dict[int, Change], batch: list[Change]) -> dict[int, Change]:
    """The store's rule, one change at a time: replace only a lower version."""
    for change in batch:
        current = table.get(change.mention_id)
        if current is None or supersedes(change, current):
            table[change.mention_id] = change
    return table


def projected(table: dict[int, Change]) -> dict[int, object]:
    return {mention_id: stored(change) for mention_id, change in table.items()}


# --------------------------------------------------------------------------- the order itself


@given(changes(), changes())
def test_later_timestamp_always_wins(a: Change, b: Change) -> None:
    if a.transaction_timestamp < b.transaction_timestamp:
        assert supersedes(b, a)
        assert not supersedes(a, b)


@given(changes(), changes())
def test_on_equal_timestamps_the_kind_rank_decides(a: Change, b: Change) -> None:
    if a.transaction_timestamp == b.transaction_timestamp and a.kind < b.kind:
        assert supersedes(b, a)
        assert not supersedes(a, b)


@given(changes(), changes())
def test_total_order_equal_versions_only_for_equal_stored_contents(a: Change, b: Change) -> None:
    """Exactly one of: a wins, b wins, or they would store the very same row (a duplicate)."""
    outcomes = [supersedes(a, b), supersedes(b, a), version_key(a) == version_key(b)]
    assert outcomes.count(True) == 1
    if version_key(a) == version_key(b):
        assert stored(a)[1:] == stored(b)[1:]  # type: ignore[index]


@given(changes(), changes(), changes())
def test_order_is_transitive(a: Change, b: Change, c: Change) -> None:
    if supersedes(a, b) and supersedes(b, c):
        assert supersedes(a, c)


@given(changes())
def test_nothing_supersedes_itself(change: Change) -> None:
    assert not supersedes(change, change)


@given(instants, offsets)
def test_offsets_do_not_change_the_instant(instant: datetime, tz: timezone) -> None:
    utc = Change(Kind.UPDATED, 1, 1, None, instant)
    local = Change(Kind.UPDATED, 1, 1, None, instant.astimezone(tz))
    assert version_key(utc) == version_key(local)


# --------------------------------------------------------------------------- consequences of the order


@given(changes(st.just(1)), changes(st.just(1)))
def test_late_insert_or_update_never_resurrects_a_later_delete(a: Change, b: Change) -> None:
    for first, second in ((a, b), (b, a)):
        final = apply_in_order({}, [first, second])[1]
        deletes = [c for c in (a, b) if c.kind is Kind.DELETED]
        others = [c for c in (a, b) if c.kind is not Kind.DELETED]
        if len(deletes) == 1 and others[0].transaction_timestamp <= deletes[0].transaction_timestamp:
            assert final.deleted


@given(changes(st.just(1)), st.integers(1, 1000))
def test_newer_insert_after_delete_brings_the_mention_back(delete: Change, later_us: int) -> None:
    if delete.kind is not Kind.DELETED:
        delete = Change(Kind.DELETED, 1, delete.organization_id, None, delete.transaction_timestamp)
    insert = Change(Kind.INSERTED, 1, 9, None, delete.transaction_timestamp + timedelta(microseconds=later_us))
    for order in ([delete, insert], [insert, delete]):
        assert apply_in_order({}, order)[1] == insert


@given(st.lists(changes(), max_size=12), st.randoms(use_true_random=False))
def test_any_delivery_order_and_duplicates_give_the_same_table(batch: list[Change], rnd: object) -> None:
    reference = projected(apply_in_order({}, batch))
    shuffled = batch + batch[: len(batch) // 2]  # duplicates
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert projected(apply_in_order({}, shuffled)) == reference


# --------------------------------------------------------------------------- coalesce


@given(st.lists(changes(), max_size=12), st.randoms(use_true_random=False))
def test_coalesce_is_order_independent_with_duplicates(batch: list[Change], rnd: object) -> None:
    shuffled = batch + batch[::2]
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert [stored(c) for c in coalesce(shuffled)] == [stored(c) for c in coalesce(batch)]


@given(st.lists(changes(), max_size=12))
def test_coalesce_keeps_the_highest_version_per_mention_sorted_by_id(batch: list[Change]) -> None:
    result = coalesce(batch)
    assert [c.mention_id for c in result] == sorted({c.mention_id for c in batch})
    for kept in result:
        rivals = [c for c in batch if c.mention_id == kept.mention_id]
        assert version_key(kept) == max(version_key(c) for c in rivals)


@given(st.lists(changes(), max_size=16), st.lists(st.integers(1, 5), max_size=8))
def test_batching_then_coalescing_equals_applying_one_by_one(batch: list[Change], sizes: list[int]) -> None:
    """However the stream is cut into batches, coalescing each batch first changes nothing."""
    table: dict[int, Change] = {}
    start = 0
    for size in [*sizes, len(batch)]:
        apply_in_order(table, coalesce(batch[start : start + size]))
        start += size
    assert projected(table) == projected(apply_in_order({}, batch))


@given(st.lists(changes(), max_size=12))
def test_touched_organizations_are_those_named(batch: list[Change]) -> None:
    assert touched_organizations(batch) == {c.organization_id for c in batch} - {None}
