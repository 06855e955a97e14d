"""Sizes and durations as the config writes them (config/units.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gsrv.config.units import format_size, parse_duration, parse_size

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("text", "size"),
    [(0, 0), (4096, 4096), ("64KiB", 65536), ("1MiB", 1 << 20), ("1.5GiB", 3 << 29), ("2KB", 2000), ("7B", 7)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["64", "64kib", "-1KiB", "KiB", True, 1.5, -3, "1 TiB", [64]])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="must be a size"):
        parse_size(bad)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_durations_scale_by_unit(n: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert parse_duration(f"{n}{unit}") == pytest.approx(n * factor)


@pytest.mark.parametrize("bad", [30, "30", "30 sec", "-1s", "1d", ""])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(bad)


def test_format_size() -> None:
    assert [format_size(n) for n in (17, 65536, 1.25 * 2**30)] == ["17B", "64KiB", "1.2GiB"]
