"""The spawner's wire (gsrv/spawn/wire.py): every message round-trips, the bytes are the layout
DESIGN.md's table gives (what a spawner in C reads), and a damaged datagram is a WireError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gsrv.contain.scope import Shape
from gsrv.spawn import wire

pytestmark = pytest.mark.timeout(60)

texts = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20)
ints = st.integers(-(2**63), 2**63 - 1)
writes = st.tuples(st.integers(0, 3), texts, texts, st.booleans())
shapes = st.builds(Shape, st.lists(texts, max_size=3).map(tuple), st.lists(writes, max_size=3).map(tuple), texts,
                   st.lists(writes, max_size=2).map(tuple), ints)  # fmt: skip
strs = st.lists(texts, max_size=6).map(tuple)
messages = st.one_of(
    st.builds(wire.Hello, ints),
    st.builds(
        wire.Spawn, ints, strs, texts, strs, texts, ints, st.tuples(ints, ints, ints), st.booleans(), shapes, ints
    ),
    st.builds(wire.Reap, ints, strs),
    st.builds(wire.Spawned, ints, ints, strs, texts),
    st.builds(wire.Failed, ints, ints, texts),
    st.builds(wire.Exited, ints, ints, st.booleans()),
    st.builds(wire.Reaped, ints, st.floats(allow_nan=False), ints),
    st.builds(wire.Left, strs),
)


@given(st.lists(messages, min_size=1, max_size=5))
def test_every_message_comes_back_as_it_went(sent: list[wire.Message]) -> None:
    assert wire.decode(wire.encode(*sent)) == sent


def test_the_bytes_are_the_declared_layout() -> None:
    """Kind u8, then the fields: i64, u8 for a bool, a string and its NUL, a string list's count
    as u32; what DESIGN.md's table says, pinned so the encoder cannot drift from it."""
    assert wire.encode(wire.Hello(1)) == bytes([1]) + struct.pack("<q", 1)
    spawn = wire.Spawn(7, ("cat", "-u"), "/bin/cat", ("A=1",), "", -1, (0, 1, -1), True, wire.NO_CGROUP, wire.REAP)
    assert wire.encode(spawn) == (
        bytes([2]) + struct.pack("<q", 7)
        + struct.pack("<I", 2) + b"cat\0-u\0"
        + b"/bin/cat\0"
        + struct.pack("<I", 1) + b"A=1\0"
        + b"\0"
        + struct.pack("<qqqq?", -1, 0, 1, -1, True)
        + struct.pack("<I", 0) + struct.pack("<I", 0) + b"tasks\0" + struct.pack("<I", 0)
        + struct.pack("<qq", 0, 1)  # the shape's top, then at_exit (REAP)
    )  # fmt: skip
    assert wire.encode(wire.Exited(9, 256, True)) == bytes([6]) + struct.pack("<qq?", 9, 256, True)
    assert wire.encode(wire.Reaped(9, 1.5, 2048)) == bytes([7]) + struct.pack("<qdq", 9, 1.5, 2048)


def test_a_file_system_name_that_is_not_utf8_keeps_its_bytes() -> None:
    """Strings are os.fsencode's bytes: a child gets the argument gsrv was given, byte for byte."""
    odd = b"caf\xe9".decode("utf-8", "surrogateescape")
    (back,) = wire.decode(wire.encode(wire.Reap(3, (odd,))))
    assert isinstance(back, wire.Reap) and back.cgroups[0].encode("utf-8", "surrogateescape") == b"caf\xe9"
    assert b"caf\xe9\0" in wire.encode(wire.Reap(3, (odd,)))


@pytest.mark.parametrize("bad", [("a\0b",), ("ok", "x\0")])
def test_a_nul_cannot_go_into_a_string(bad: tuple[str, ...]) -> None:
    spawn = wire.Spawn(1, bad, "/bin/cat", (), "", -1, (0, 1, 2), True, wire.NO_CGROUP, wire.HOLD)
    with pytest.raises(wire.WireError, match="null byte"):
        wire.encode(spawn)
    with pytest.raises(wire.WireError, match="null byte"):
        wire.encode(wire.Failed(1, 2, "why\0"))


def test_a_datagram_cut_anywhere_or_of_another_kind_is_refused() -> None:
    shape = Shape(("/a", "/b"), ((1, "pids.max", "11", False),), "tasks", ())
    whole = wire.encode(wire.Spawn(7, ("cat",), "/bin/cat", ("A=1",), "/", 0o22, (0, 1, 2), False, shape, wire.HOLD))
    for end in range(1, len(whole)):
        with pytest.raises(wire.WireError):
            wire.decode(whole[:end])
    with pytest.raises(wire.WireError, match="no message of kind 200"):
        wire.decode(bytes([200]) + whole[1:])
    with pytest.raises(wire.WireError, match="run past"):  # a count no datagram can hold
        wire.decode(bytes([3]) + struct.pack("<qI", 1, 10**6))
    with pytest.raises(wire.WireError, match="cannot fit"):
        wire.decode(whole[:-20] + struct.pack("<I", 10**6) + whole[-16:])  # the Shape's after: a list of records


@given(st.binary(max_size=64))
def test_any_bytes_give_messages_or_a_wire_error(data: bytes) -> None:
    """Never another exception: a spawner fed garbage says so and exits, it does not crash."""
    try:
        found = wire.decode(data)
    except wire.WireError:
        return
    assert all(isinstance(message, wire.MESSAGES) for message in found)
