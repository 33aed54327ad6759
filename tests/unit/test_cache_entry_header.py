"""The header a value filled through the helper is stored behind (indexer/cache/keys.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from indexer.cache import keys


@given(epoch=st.integers(min_value=1, max_value=2**63 - 1), value=st.binary(max_size=64))
def test_a_filled_value_comes_back_with_its_epoch(epoch: int, value: bytes) -> None:
    stored = keys.entry_header(str(epoch)) + value
    assert keys.recorded_epoch(stored) == (str(epoch).encode(), keys.entry_header(str(epoch)))
    assert keys.recorded_epoch(stored[: keys.HEADER_MAX_BYTES]) is not None  # the audit reads just the head
    assert keys.stored_value(stored) == value
    assert keys.servable(stored, str(epoch).encode()) == value
    assert keys.servable(stored, str(epoch + 1).encode()) is None  # filled under another epoch: stale


@pytest.mark.parametrize(
    "direct", [b"", b"plain", b"\x00MI1", b"\x00MI1\x00", b"\x00MI1\x0012", b"\x00MI1\x00x\x00v", b"\x00MI2\x001\x00v"]
)
def test_a_value_written_directly_is_served_as_it_is(direct: bytes) -> None:
    assert keys.recorded_epoch(direct) is None
    assert keys.stored_value(direct) == direct
    assert keys.servable(direct, b"1") == direct


def test_an_epoch_is_decimal() -> None:
    with pytest.raises(ValueError):
        keys.entry_header(b"1\x002")


def test_data_keys_are_parsed_as_the_tracker_does() -> None:
    assert keys.parse_data_key("p", b"p:{42}:k:x") == (42, b"p:{42}:k:x")
    for other in (b"p:{042}:k", b"p:{42}", b"p2:{42}:k", b"p:idx:{42}", b"p:{0}:k"):
        assert keys.parse_data_key("p", other) is None
    assert keys.data_key_pattern("app:m") == "app:m:{*"
