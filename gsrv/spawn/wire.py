"""The spawner's wire, declared once: every message between gsrv (spawn/client.py) and the
spawner process (spawn/spawner.py), typed, and their encoding, plain enough for a C spawner.

One SOCK_SEQPACKET datagram holds one or more messages back to back (a `Spawn` goes alone: its
stdio travels with it as SCM_RIGHTS). A message is its kind (u8), then its fields in the order
declared here, little-endian: int i64, float f64, bool u8, str its bytes (os.fsencode's: UTF-8,
surrogateescape) and a NUL, tuple[X, ...] u32 count + each X (strings: as C's argv), a fixed
tuple each item, a record its fields. Each side's first message is `Hello`; another VERSION ends the
conversation. DESIGN.md's "The spawner's wire" is this module as a table.
"""

from __future__ import annotations

import dataclasses
import struct
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from gsrv.contain.scope import Shape

VERSION = 2

# A Spawn's `at_exit`: what the spawner does at the child's exit (DESIGN.md, invariant 4)
HOLD = 0  # keep the zombie until gsrv's Reap: its ladder may still signal the pid or the group
REAP = 1  # reap it at once (kill_scope = "group": a group has no member list, its zombie would answer killpg)
REAP_IF_EMPTY = 2  # reap it at once if no process is left in its cgroup (the ladder then signals nothing)
REAP_AND_REMOVE_IF_EMPTY = 3  # the same, and remove its cgroups: gsrv reads nothing of them

NO_CGROUP = Shape(())  # a Spawn's cgroup when the child gets none of its own


class WireError(ValueError):
    """A datagram that is not messages of this version: the other side is not gsrv's peer."""


# -- gsrv to the spawner -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The first message each way: the wire's version the sender speaks."""

    KIND: ClassVar[int] = 1
    version: int


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start one child. stdio: for fds 0, 1, 2 an index into the datagram's SCM_RIGHTS fds, or
    -1 for /dev/null; cwd "" and umask -1: the spawner's own; cgroup: NO_CGROUP, or the Shape
    (contain/scope.py) of the pool cgroup the child is born in; at_exit: HOLD, REAP,
    REAP_IF_EMPTY or REAP_AND_REMOVE_IF_EMPTY (above)."""

    KIND: ClassVar[int] = 2
    seq: int
    argv: tuple[str, ...]
    executable: str
    env: tuple[str, ...]  # NAME=value
    cwd: str
    umask: int
    stdio: tuple[int, int, int]
    setsid: bool
    cgroup: Shape
    at_exit: int


@dataclass(frozen=True, slots=True)
class Reap:
    """gsrv's stop ladder is done with the child: reap it (now, or at its exit; pid 0: it was
    reaped at its exit) and remove its cgroups behind."""

    KIND: ClassVar[int] = 3
    pid: int
    cgroups: tuple[str, ...]


# -- the spawner to gsrv, in batches -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawned:
    """The Spawn `seq` started `pid` in the pool cgroup `cgroup` ("" for none); `stuck`: the
    writes of the spawner's way home that failed."""

    KIND: ClassVar[int] = 4
    seq: int
    pid: int
    stuck: tuple[str, ...]
    cgroup: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The Spawn `seq` started nothing: the errno and why, for a person."""

    KIND: ClassVar[int] = 5
    seq: int
    errno: int
    why: str


@dataclass(frozen=True, slots=True)
class Exited:
    """The child exited; `status`: wait()'s word. A zombie still (its pid and group stay
    taken) unless it was reaped at its exit (its Reaped follows in the same datagram): with
    REAP, or with the *_IF_EMPTY modes when `alone` (no process was left in its cgroup)."""

    KIND: ClassVar[int] = 6
    pid: int
    status: int
    alone: bool


@dataclass(frozen=True, slots=True)
class Reaped:
    """The child is reaped, after its Exited: the CPU it and what it waited for used, its peak RSS."""

    KIND: ClassVar[int] = 7
    pid: int
    cpu_ms: float
    maxrss_kib: int


@dataclass(frozen=True, slots=True)
class Left:
    """Session cgroups the sweeper could not remove (still busy after its tries)."""

    KIND: ClassVar[int] = 8
    cgroups: tuple[str, ...]


Message = Hello | Spawn | Reap | Spawned | Failed | Exited | Reaped | Left
MESSAGES: tuple[type[Message], ...] = (Hello, Spawn, Reap, Spawned, Failed, Exited, Reaped, Left)

# -- the encoding, written once per message from the declarations above --------------------
#
# Each message's encoder and decoder are Python source made from its declaration at import (as
# dataclasses makes __init__): one struct call for each run of numbers, a list of strings joined
# or split and coded in one call. A spawn of 20 variables costs ~10 µs each way here, marshal's
# ~3: the price of a format a C spawner can read without Python's.

Put = Callable[[list[bytes], Any], None]
Data = bytes | bytearray  # a datagram as received (the spawner reads into a bytearray)
Get = Callable[[Data, int], tuple[Any, int]]
_U32 = struct.Struct("<I")
_FORMAT = {int: "q", float: "d", bool: "?"}


def _raw(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise WireError(f"a string with an embedded null byte cannot be an argument or a variable: {value!r}")
    return raw


def _str(value: str) -> bytes:
    return _raw(value) + b"\0"


def _get_str(data: Data, at: int) -> tuple[str, int]:
    end = data.find(b"\0", at)
    if end < 0:
        raise WireError("a string runs past the datagram's end")
    return data[at:end].decode("utf-8", "surrogateescape"), end + 1


def _strs(out: list[bytes], values: tuple[str, ...]) -> None:
    """As C's argv and envp hold them: the count, then each string and its NUL (joined and
    encoded in one call each: a NUL inside a string shows as one NUL too many)."""
    if not values:
        out.append(_U32.pack(0))
        return
    joined = "\0".join(values)
    if joined.count("\0") != len(values) - 1:
        for value in values:
            _raw(value)  # says which
    out.append(_U32.pack(len(values)))
    out.append(joined.encode("utf-8", "surrogateescape") + b"\0")


def _get_strs(data: Data, at: int) -> tuple[tuple[str, ...], int]:
    (count,) = _U32.unpack_from(data, at)
    at += 4
    if not count:
        return (), at
    parts = data[at:].split(b"\0", count)  # the count-th NUL ends the list
    if len(parts) <= count:
        raise WireError(f"{count} strings run past the datagram's end")
    end = len(data) - len(parts[-1])  # just past that NUL
    # one decode and one split for all: a NUL byte is never inside a UTF-8 sequence
    return tuple(data[at : end - 1].decode("utf-8", "surrogateescape").split("\0")), end


def _count(data: Data, at: int) -> tuple[int, int]:
    (count,) = _U32.unpack_from(data, at)
    if count > len(data) - at:  # an item takes a byte at least
        raise WireError(f"{count} items cannot fit in what is left of the datagram")
    return count, at + 4


def _fields(kind: Any) -> list[str]:
    """A record's fields in order (a message, or contain/scope.py's Shape); none for another type."""
    return [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else []


class _Writer:
    """One message's `put(out, m)` and `get(data, at)` as source, and the names they use."""

    def __init__(self) -> None:
        self.names: dict[str, object] = {"_str": _str, "_strs": _strs, "_get_str": _get_str, "_get_strs": _get_strs,
                                         "_count": _count, "_U32": _U32}  # fmt: skip
        self.put: list[str] = []
        self.get: list[str] = []
        self.run: list[tuple[str, str, str]] = []  # numbers waiting: (format, put's expression, get's name)
        self.fresh = 0

    def name(self, value: object) -> str:
        self.fresh += 1
        self.names[f"_n{self.fresh}"] = value
        return f"_n{self.fresh}"

    def var(self) -> str:
        self.fresh += 1
        return f"v{self.fresh}"

    def flush(self, indent: str) -> None:
        """The numbers waiting, as one struct call each way."""
        if not self.run:
            return
        form = struct.Struct("<" + "".join(f for f, _, _ in self.run))
        packed = self.name(form)
        self.put.append(f"{indent}out.append({packed}.pack({', '.join(e for _, e, _ in self.run)}))")
        self.get.append(f"{indent}{', '.join(v for _, _, v in self.run)}, = {packed}.unpack_from(data, at)")
        self.get.append(f"{indent}at += {form.size}")
        self.run = []

    def value(self, kind: Any, expr: str, indent: str) -> str:
        """Lines that put `expr` (of type `kind`) and get it back; the expression of the value got."""
        if kind in _FORMAT:
            got = self.var()
            self.run.append((_FORMAT[kind], expr, got))
            return got
        args = typing.get_args(kind) if typing.get_origin(kind) is tuple else None
        if args is not None and not (len(args) == 2 and args[1] is Ellipsis):
            return "(" + "".join(f"{self.value(a, f'{expr}[{i}]', indent)}, " for i, a in enumerate(args)) + ")"
        names = _fields(kind)
        if names:
            hints = typing.get_type_hints(kind)
            parts = [self.value(hints[n], f"{expr}.{n}", indent) for n in names]
            return f"{self.name(kind)}({', '.join(parts)})"
        self.flush(indent)  # a part of its own size: the numbers before it go first
        got = self.var()
        if kind is str:
            self.put.append(f"{indent}out.append(_str({expr}))")
            self.get.append(f"{indent}{got}, at = _get_str(data, at)")
        elif args is not None and args[0] is str:
            self.put.append(f"{indent}_strs(out, {expr})")
            self.get.append(f"{indent}{got}, at = _get_strs(data, at)")
        elif args is not None:
            item, count = self.var(), self.var()
            self.put += [f"{indent}out.append(_U32.pack(len({expr})))", f"{indent}for {item} in {expr}:"]
            self.get += [f"{indent}{count}, at = _count(data, at)", f"{indent}{got} = []",
                         f"{indent}for _ in range({count}):"]  # fmt: skip
            one = self.value(args[0], item, indent + "    ")
            self.flush(indent + "    ")
            self.get.append(f"{indent}    {got}.append({one})")
            return f"tuple({got})"
        else:
            raise TypeError(f"the wire has no encoding for {kind!r}")
        return got

    def compile(self, message: type[Message]) -> tuple[Put, Get]:
        self.run.append(("B", str(message.KIND), "_"))  # get reads its kind again: decode looked at it
        made = self.value(message, "m", "    ")
        self.flush("    ")
        source = "\n".join(["def put(out, m):", *self.put, "def get(data, at):", *self.get, f"    return {made}, at"])
        exec(compile(source, f"<wire {message.__name__}>", "exec"), self.names)  # noqa: S102 (our declarations only)
        return typing.cast(Put, self.names["put"]), typing.cast(Get, self.names["get"])


_PUT: dict[type[Message], Put] = {}
_GET: dict[int, Get] = {}
for _message in MESSAGES:
    _PUT[_message], _GET[_message.KIND] = _Writer().compile(_message)


def encode(*messages: Message) -> bytes:
    """One datagram: each message's kind, then its fields."""
    out: list[bytes] = []
    for message in messages:
        _PUT[type(message)](out, message)
    return b"".join(out)


def decode(data: Data) -> list[Message]:
    """The messages of one datagram, in order. Raises WireError."""
    found: list[Message] = []
    at = 0
    try:
        while at < len(data):
            get = _GET.get(data[at])
            if get is None:
                raise WireError(f"no message of kind {data[at]} in wire version {VERSION}")
            message, at = get(data, at)
            found.append(message)
    except struct.error as e:
        raise WireError(f"a message cut short ({e})") from None
    return found
