"""A chunked body's framing read strictly, without a socket (edge/chunked.py): what it gives,
where it ends, and the lenient forms that would let a request hide inside a body."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gsrv.edge.chunked import MAX_TRAILERS, ChunkError, Dechunker


def read_all(raw: bytes, step: int = 0) -> tuple[bytes, bytes]:
    """The body and what followed it, fed whole or `step` bytes at a time."""
    framing, body = Dechunker(), bytearray()
    pieces = [raw[i : i + step] for i in range(0, len(raw), step)] if step else [raw]
    for n, piece in enumerate(pieces):
        framing.feed(piece)
        while (data := framing.next()) is not None:
            if not data:
                return bytes(body), framing.rest + b"".join(pieces[n + 1 :])
            body += data
    raise AssertionError(f"no end in {raw!r}")


@pytest.mark.parametrize("step", [0, 1, 3])
def test_chunks_extensions_and_trailers_then_the_next_request(step: int) -> None:
    raw = b"5\r\nhello\r\n6;name=value\t;x\r\n world\r\n0\r\nX-Sum: 1\r\nY:\r\n\r\nGET / HTTP/1.1\r\n"
    assert read_all(raw, step) == (b"hello world", b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize("raw", [
    b"0\r\n\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n",  # the probe's: a bare LF ends the trailers
    b"0\r\nX: 1\n\r\n",  # a trailer line ending in a bare LF
    b"1;a\rb\r\nx\r\n0\r\n\r\n",  # a bare CR in an extension
    b"1\nx\r\n0\r\n\r\n",  # a size line ending in a bare LF
    b"1\r\nx\n0\r\n\r\n",  # a chunk's data ending in a bare LF
    b"1\r\nxy\r\n0\r\n\r\n",  # more data than the size
    b"0x1\r\nx\r\n0\r\n\r\n", b"-1\r\n", b" 1\r\nx\r\n", b"\r\n",  # not hex digits
    b"1;a\x00\r\nx\r\n0\r\n\r\n",  # a control character in an extension
    b"0\r\nnot a field\r\n\r\n", b"0\r\n folded: x\r\n\r\n",  # trailers that are not fields
    b"1234567890abcdef0\r\n",  # a size past any body
])  # fmt: skip
def test_lenient_framing_is_an_error(raw: bytes) -> None:
    framing = Dechunker()
    framing.feed(raw)
    with pytest.raises(ChunkError):
        while framing.next():
            pass


def test_trailers_and_size_lines_are_bounded_before_they_end() -> None:
    framing = Dechunker()
    framing.feed(b"0\r\n" + b"X: " + b"a" * MAX_TRAILERS)
    with pytest.raises(ChunkError):
        framing.next()
    framing = Dechunker()
    framing.feed(b"1" + b";" * 5000)
    with pytest.raises(ChunkError):
        framing.next()


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=7))
def test_any_bytes_give_data_an_end_or_a_chunk_error_and_nothing_else(raw: bytes, step: int) -> None:
    framing = Dechunker()
    try:
        for i in range(0, len(raw), step):
            framing.feed(raw[i : i + step])
            while (data := framing.next()) is not None and data:
                assert len(data) <= len(raw)
    except ChunkError:
        pass


@given(st.lists(st.binary(min_size=1, max_size=50), max_size=8), st.integers(min_value=1, max_value=9))
def test_what_a_strict_writer_frames_reads_back(chunks: list[bytes], step: int) -> None:
    raw = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\nnext"
    assert read_all(raw, step) == (b"".join(chunks), b"next")
