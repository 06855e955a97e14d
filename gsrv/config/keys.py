"""Each config key declared once: how it is read (type and bounds), its default as the TOML
file writes it, a one-line doc and what a SIGHUP does to it (gunicorn's Setting, as dataclass
field metadata). The parser, `gsrv check` and the test of the shipped conf/gsrv.toml read
these declarations; nothing else writes a key's default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from gsrv.config.table import Table
from gsrv.config.units import describe, format_size

Read = Callable[[Table, str, Any], Any]  # (table, key, default as TOML writes it) -> the value, checked

NEW_SESSIONS = "applies to sessions that start after it; running ones keep theirs"
AT_ONCE = "applies at once"
METADATA = "gsrv.key"


@dataclass(frozen=True)
class Key:
    """One key: `default` as TOML writes it (None: derived from other keys, the doc says how;
    or required); `example` ships it commented out in conf/gsrv.toml (optional, or a value
    only some hosts can honour); `shown`: `gsrv check` prints it even at its default."""

    read: Read
    default: Any
    doc: str
    reload: str = NEW_SESSIONS
    example: Any = None
    required: bool = False
    shown: bool = False
    show: Callable[[Any], str] = str  # how `gsrv check` prints a value


class Reader:
    """A Read with the way `gsrv check` prints what it read."""

    def __init__(self, read: Read, show: Callable[[Any], str]) -> None:
        self.read, self.show = read, show

    def __call__(self, t: Table, name: str, default: Any) -> Any:
        return self.read(t, name, default)


def key(read: Read, default: Any, doc: str, *, reload: str = NEW_SESSIONS, example: Any = None,
        value: Any = dataclasses.MISSING, shown: bool = False,
        show: Callable[[Any], str] | None = None) -> Any:  # fmt: skip
    """A dataclass field for a key. Its default value is `default` read as the file would be,
    unless `value` gives it (a default derived from other keys)."""
    show = show or (read.show if isinstance(read, Reader) else _plain)
    declared = Key(read, default, doc, reload, example, shown=shown, show=show)
    if value is dataclasses.MISSING:
        value = read(Table("<defaults>", "defaults", {}, ()), "default", default)
    return dataclasses.field(default=value, metadata={METADATA: declared})


def required(read: Read, doc: str, example: Any, *, reload: str = NEW_SESSIONS) -> Any:
    """A field for a key without a default: a file must set it."""
    return dataclasses.field(metadata={METADATA: Key(read, None, doc, reload, example, required=True, show=_plain)})


def _plain(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join("=".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value) or "none"
    return str(value)


def changed(instance: Any) -> Iterator[tuple[str, str]]:
    """(name, value as `gsrv check` prints it) of each key that is shown always or differs
    from its default, in declaration order."""
    for f in dataclasses.fields(instance):
        declared_key = f.metadata.get(METADATA)
        if declared_key is None:
            continue
        value = getattr(instance, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if declared_key.shown or (not declared_key.required and value != default):
            yield f.name, declared_key.show(value)


def declared(cls: type) -> Iterator[tuple[str, Key]]:
    """(name, Key) of each of a config dataclass's fields that is a key, in declaration order."""
    for f in dataclasses.fields(cls):
        if METADATA in f.metadata:
            yield f.name, f.metadata[METADATA]


def names(*classes: type) -> tuple[str, ...]:
    return tuple(name for cls in classes for name, _ in declared(cls))


def read_all(t: Table, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every declared key of cls from the table: its value there, checked, or its default.
    A required key that is missing is an error that shows an example."""
    values = {}
    for name, k in declared(cls):
        if name in skip:
            continue
        if k.required and name not in t.data:
            raise t.fail(name, f"is required (for example {name} = {toml(k.example)})")
        if k.default is None and not k.required and name not in t.data:
            continue  # derived from other keys by the caller
        values[name] = k.read(t, name, k.default)
    return values


def toml(value: Any) -> str:
    """A value as TOML writes it (for messages and `gsrv check --keys`)."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }" if value else "{}"
    return str(value)


# -- readers: each wraps one of Table's typed getters with its bounds --------------------


def integer(low: int) -> Read:
    return lambda t, name, default: t.integer(name, default, low)


def size(low: int, high: int) -> Read:
    return Reader(lambda t, name, default: t.size(name, default, low, high), format_size)


def duration(zero_means: str | None = None) -> Read:
    shown_as = {"no limit": "none", "off": "off"}.get(zero_means or "", "0s")
    return Reader(lambda t, name, default: t.duration(name, default, zero_means),
                  lambda seconds: f"{seconds:g}s" if seconds else shown_as)  # fmt: skip


def choice(*options: str) -> Read:
    return lambda t, name, default: t.choice(name, default, options)


def strings(non_empty: bool = False) -> Read:
    return lambda t, name, default: t.strings(name, tuple(default or ()), non_empty)


def string_table() -> Read:
    return lambda t, name, default: t.string_table(name)


def amount() -> Read:
    return lambda t, name, default: t.amount(name, default)


def bits(example: str) -> Read:
    """Permission bits, "0660" or 0o660 (a unix socket's mode, a umask)."""

    def read(t: Table, name: str, default: Any) -> int:
        value = t.data.get(name, default)
        if isinstance(value, str) and value.isdigit() and set(value) <= set("01234567") and int(value, 8) <= 0o777:
            return int(value, 8)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
            return value
        raise t.fail(name, f'must be permission bits like "{example}" (got {describe(value)})')

    return read


def flag() -> Read:
    """true or false."""

    def read(t: Table, name: str, default: Any) -> bool:
        value = t.data.get(name, default)
        if not isinstance(value, bool):
            raise t.fail(name, f"must be true or false (got {describe(value)})")
        return value

    return Reader(read, lambda value: "true" if value else "false")
