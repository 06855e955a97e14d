"""The upgrade's state record (issue 38): what a running gsrv hands its new code across the
exec, as plain values (JSON, never pickle) in a sealed memfd. It is never written to disk or
logged: it will carry reattach and watch tokens and the auth success cache.

Each fd the new code is to take over is named by its role ("listener:NAME:I", "spawner",
"guardian", "session:SID"). The record's version is read before anything else in it, and a
record of another version is refused before any fd it names is touched. Nothing here touches
those fds: whoever takes them over checks each as it does.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gsrv.errors import GsrvError

VERSION = 1  # the record's schema; a new code that reads another refuses it, naming both
MAX_BYTES = 64 * 1024 * 1024  # more is not a record of ours
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
MEMFD_NAME = "gsrv-upgrade-record"


class RecordError(GsrvError):
    """A record the new code cannot take: why, in a line an operator can act on."""


@dataclass(frozen=True)
class Record:
    """The previous code (to re-exec if the takeover fails), the config it ran, the fds by
    role, and each part's own plain values (`state`: a part's name -> its values)."""

    executable: str  # the previous code's executable and argv: a failed takeover execs them again
    argv: tuple[str, ...]
    gsrv_version: str
    config: str  # the config file's path and the --set overrides the previous code ran with
    overrides: tuple[str, ...] = ()
    fds: Mapping[str, int] = field(default_factory=dict)
    state: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> bytes:
        return json.dumps({"version": VERSION, "executable": self.executable, "argv": list(self.argv),
                           "gsrv_version": self.gsrv_version, "config": self.config,
                           "overrides": list(self.overrides), "fds": dict(self.fds), "state": dict(self.state)},
                          separators=(",", ":"), allow_nan=False).encode()  # fmt: skip


def write(record: Record) -> int:
    """A new sealed memfd holding the record (close-on-exec: the exec's caller makes it
    inheritable on purpose, as every fd that must survive the exec)."""
    data = record.as_json()
    if len(data) > MAX_BYTES:
        raise RecordError(f"the upgrade record would be {len(data)} bytes, over its bound of {MAX_BYTES}")
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read(fd: int) -> Record:
    """The record in fd: sealed, of this version, every field of the type it must be."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        size = os.fstat(fd).st_size
    except OSError as e:
        raise RecordError(f"fd {fd} is not an upgrade record: {e.strerror}") from None
    if seals & SEALS != SEALS:
        raise RecordError(f"fd {fd} is not a sealed upgrade record (seals {seals:#x}, wanted {SEALS:#x})")
    if size > MAX_BYTES:
        raise RecordError(f"the upgrade record in fd {fd} is {size} bytes, over its bound of {MAX_BYTES}")
    data = os.pread(fd, size, 0)  # (not the fd's offset: the writer's, shared across the exec)
    try:
        found = json.loads(data)
    except ValueError as e:
        raise RecordError(f"the upgrade record in fd {fd} is not JSON: {e}") from None
    if not isinstance(found, dict):
        raise RecordError(f"the upgrade record in fd {fd} is a JSON {type(found).__name__}, not an object")
    version = found.get("version")
    if version != VERSION:
        raise RecordError(f"the upgrade record is version {version!r}; this gsrv reads version {VERSION} only")
    return Record(
        executable=_typed(found, "executable", str), argv=tuple(_strings(found, "argv")),
        gsrv_version=_typed(found, "gsrv_version", str), config=_typed(found, "config", str),
        overrides=tuple(_strings(found, "overrides")), fds=_fds(found), state=_typed(found, "state", dict),
    )  # fmt: skip


def _typed(found: dict[str, Any], key: str, kind: type) -> Any:
    value = found.get(key)
    if not isinstance(value, kind):
        raise RecordError(f"the upgrade record's {key!r} is {value!r}: expected a {kind.__name__}")
    return value


def _strings(found: dict[str, Any], key: str) -> list[str]:
    values: list[str] = _typed(found, key, list)
    if not all(isinstance(v, str) for v in values):
        raise RecordError(f"the upgrade record's {key!r} is {values!r}: expected a list of strings")
    return values


def _fds(found: dict[str, Any]) -> dict[str, int]:
    fds: dict[str, int] = _typed(found, "fds", dict)
    for role, fd in fds.items():
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise RecordError(f"the upgrade record's fd for {role!r} is {fd!r}: expected an fd number")
    return fds
