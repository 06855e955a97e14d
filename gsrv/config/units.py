"""Sizes and durations as the config spells them ("64KiB", "1.5s").

Pure functions: each returns the value or raises ValueError with a message a person can act on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SIZE_UNITS = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*")

SIZE_HINT = 'a size: bytes as an integer or a string like "64KiB" (units B, KiB, MiB, GiB, KB, MB, GB)'
DURATION_HINT = 'a duration: a string like "30s" (units ms, s, m, h)'


def describe(value: object) -> str:
    """Show a TOML value and its type the way an error message quotes it."""
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    kind = kinds.get(type(value), type(value).__name__)
    shown = f'"{value}"' if isinstance(value, str) else repr(value)
    if isinstance(value, bool):
        shown = "true" if value else "false"
    if isinstance(value, (list, dict)) and len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown}, {kind}"


def parse_size(value: object) -> int:
    """Bytes from an integer or a "<number><unit>" string."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must be {SIZE_HINT} (got {describe(value)}: negative)")
        return value
    if isinstance(value, str):
        match = _NUMBER_UNIT.fullmatch(value)
        if match and match.group(2) in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    raise ValueError(f"must be {SIZE_HINT} (got {describe(value)})")


def parse_duration(value: object) -> float:
    """Seconds from a "<number><unit>" string."""
    if isinstance(value, str):
        match = _NUMBER_UNIT.fullmatch(value)
        if match and match.group(2) in _DURATION_UNITS:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f"must be {DURATION_HINT} (got {describe(value)})")


def format_size(n: float) -> str:
    """Human form of a byte count for log lines: 1.2GiB, 640KiB, 17B."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.1f}".rstrip("0").rstrip(".") + unit
    return f"{int(n)}B"


@dataclass(frozen=True)
class Amount:
    """A size in bytes, or a percentage of a total known only later (memory, say)."""

    size: int | None = None
    percent: float | None = None

    def of(self, total: int) -> int:
        return self.size if self.size is not None else int(total * (self.percent or 0.0) / 100)

    def scaled(self, factor: float) -> Amount:
        if self.size is not None:
            return Amount(size=int(self.size * factor))
        return Amount(percent=(self.percent or 0.0) * factor)

    def __str__(self) -> str:
        return format_size(self.size) if self.size is not None else f"{self.percent:g}%"


def parse_amount(value: object) -> Amount:
    """A size, or "<number>%" (0 < n < 100)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", value)
        if match and 0 < float(match.group(1)) < 100:
            return Amount(percent=float(match.group(1)))
        raise ValueError(f'must be a percentage between 0 and 100, like "5%" (got {describe(value)})')
    try:
        return Amount(size=parse_size(value))
    except ValueError:
        raise ValueError(f'must be a size like "512MiB" or a percentage like "5%" (got {describe(value)})') from None
