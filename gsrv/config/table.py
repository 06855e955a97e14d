"""One TOML table being read: typed getters whose errors name the file, table and key."""

from __future__ import annotations

import difflib
from typing import Any

from gsrv.config.units import Amount, describe, format_size, parse_amount, parse_duration, parse_size
from gsrv.errors import ConfigError


def did_you_mean(word: str, known: tuple[str, ...], shape: str) -> str | None:
    """'did you mean "max_sessions"?' for a near miss (shape writes the match), else None."""
    close = difflib.get_close_matches(word, known, n=1)
    return f"did you mean {shape.format(close[0])}?" if close else None


class Table:
    """One TOML table being read: typed getters that raise ConfigError naming file and key."""

    def __init__(self, file: str, name: str, data: dict[str, Any], known: tuple[str, ...]) -> None:
        self.file, self.name, self.data = file, name, data
        for key in data:
            if key not in known:
                hint = did_you_mean(key, known, '"{}"') or "known keys: " + ", ".join(known)
                raise ConfigError(file, f"[{name}]", f'has unknown key "{key}" ({hint})')

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, f"[{self.name}] {key}", message)

    def integer(self, key: str, default: int, low: int) -> int:
        value = self.data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.fail(key, f"must be an integer >= {low} (got {describe(value)})")
        return value

    def size(self, key: str, default: int, low: int, high: int) -> int:
        value = self.data.get(key, default)
        try:
            size = parse_size(value)
        except ValueError as e:
            raise self.fail(key, str(e)) from None
        if not low <= size <= high:
            span = f"between {format_size(low)} and {format_size(high)}"
            raise self.fail(key, f"must be {span} (got {describe(value)})")
        return size

    def duration(self, key: str, default: str, zero_means: str | None = None) -> float:
        value = self.data.get(key, default)
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            raise self.fail(key, str(e)) from None
        if seconds == 0 and zero_means is None:
            raise self.fail(key, f'must be greater than 0, like "{default}" (got {describe(value)})')
        return seconds

    def amount(self, key: str, default: object) -> Amount:
        """A size or a percentage of total memory ("5%"); default as TOML writes it."""
        try:
            return parse_amount(self.data.get(key, default))
        except ValueError as e:
            raise self.fail(key, str(e)) from None

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        value = self.data.get(key, default)
        if value not in options:
            listed = ", ".join(f'"{o}"' for o in options)
            raise self.fail(key, f"must be one of {listed} (got {describe(value)})")
        return str(value)

    def strings(self, key: str, default: tuple[str, ...], non_empty: bool = False) -> tuple[str, ...]:
        value = self.data.get(key, list(default))
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        if not ok or (non_empty and not value):
            what = "a non-empty array of non-empty strings" if non_empty else "an array of strings"
            raise self.fail(key, f"must be {what} (got {describe(value)})")
        return tuple(value)

    def string_table(self, key: str) -> tuple[tuple[str, str], ...]:
        value = self.data.get(key, {})
        expected = 'must be a table of strings, like { NAME = "value" }'
        if not isinstance(value, dict):
            raise self.fail(key, f"{expected} (got {describe(value)})")
        for name, item in value.items():
            if not isinstance(item, str):
                raise self.fail(key, f"{expected} (got {name} = {describe(item)})")
            if not name or "=" in name:
                raise self.fail(key, f'names must be non-empty and without "=" (got {describe(name)})')
        return tuple(value.items())
