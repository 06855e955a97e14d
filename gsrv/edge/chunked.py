"""A chunked request body's framing (RFC 9112 §7.1), read strictly and without I/O: every line
ends in CRLF (a bare CR or LF is an error, never a line's end), a chunk's size is hex digits,
an extension and a trailer field carry no control character but HTAB, the trailers are at most
MAX_TRAILERS bytes. A front proxy that parses the framing strictly then never reads another
request's start where gsrv reads a body's end (request smuggling).
"""

from __future__ import annotations

import re

from gsrv.errors import GsrvError

MAX_SIZE_LINE = 4096  # a chunk's size line, its extensions included
MAX_TRAILERS = 16 * 1024  # as the head's limit (edge/httphead.py MAX_HEAD)
SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(;[^\x00-\x08\x0a-\x1f\x7f]*)?")
FIELD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*")


class ChunkError(GsrvError):
    """The body's framing is broken: the connection cannot be read any further."""


class Dechunker:
    """Fed the client's bytes, gives the body's data, b"" at its end (the last chunk and the
    trailers read), None when it needs more; `rest` is what came after the body."""

    __slots__ = ("_buffer", "_left", "_state", "_trailers")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._left = 0  # of the current chunk's data
        self._state = "size"  # size -> data -> data_end -> size ... -> trailers -> end
        self._trailers = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    @property
    def rest(self) -> bytes:
        return bytes(self._buffer) if self._state == "end" else b""

    def next(self) -> bytes | None:
        while True:
            if self._state == "end":
                return b""
            if self._state == "data":
                if not self._buffer:
                    return None
                data = bytes(self._buffer[: self._left])
                del self._buffer[: len(data)]
                self._left -= len(data)
                if not self._left:
                    self._state = "data_end"
                return data
            line = self._line(MAX_SIZE_LINE if self._state != "trailers" else MAX_TRAILERS - self._trailers)
            if line is None:
                return None
            if self._state == "data_end":
                if line:
                    raise ChunkError("a chunk's data is longer than its size")
                self._state = "size"
            elif self._state == "size":
                self._size(line)
            else:
                self._trailer(line)

    def _line(self, most: int) -> bytes | None:
        """The next line without its CRLF; None until it is complete."""
        end = self._buffer.find(b"\r\n")
        region = self._buffer if end < 0 else self._buffer[:end]
        if b"\n" in region or b"\r" in region[:-1] or (end >= 0 and b"\r" in region):
            raise ChunkError("a bare CR or LF in the chunked framing")
        if (len(region) if end >= 0 else len(region) - 1) > most:
            raise ChunkError("a chunk's size line or the trailers are too long")
        if end < 0:
            return None
        line = bytes(region)
        del self._buffer[: end + 2]
        return line

    def _size(self, line: bytes) -> None:
        match = SIZE_LINE.fullmatch(line)
        if match is None:
            raise ChunkError("a chunk's size is not hex digits (and extensions)")
        self._left = int(match[1], 16)
        self._state = "data" if self._left else "trailers"

    def _trailer(self, line: bytes) -> None:
        if not line:
            self._state = "end"
            return
        if not FIELD.fullmatch(line):
            raise ChunkError("a trailer line that is not a field")
        self._trailers += len(line) + 2
