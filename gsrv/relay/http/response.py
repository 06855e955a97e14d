"""One HTTP response as it goes out (sans-I/O but for the `send` it is given): the framing is
chosen once, when the head is written, and one writer per framing owns what it sent, the last
byte it holds back and its own failure (h11's _writers.py is the model). The status lives here.

A response must never look complete when the child failed: one complete at its head, or at
its Content-Length, holds its last byte until `end` (a clean verdict) sends it; a chunked one
sends its last chunk, with the exit as a trailer, only then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from gsrv.relay.http.cgi import EXIT_FIELD, Broken, Failure, Head, head_bytes
from gsrv.relay.pump import Meter

NO_BODY = (204, 304)

Send = Callable[[bytes | memoryview], float]  # the connection's send: the seconds it waited


class Writer:
    """A response body in one framing: `frame` gives the bytes to send for the child's output,
    `last` what completes it on a clean end, `short` whether it ended before its length."""

    framing: ClassVar[str]  # as the head writes it: length, chunked, close, none
    keeps: ClassVar[bool] = True  # the connection can carry another request after it
    drops = False  # the body is not sent (HEAD, 204, 304)

    def __init__(self) -> None:
        self.sent = 0  # body bytes sent
        self.held = b""  # the last byte, until the verdict
        self.failure: Failure | None = None
        self.status: int | None = None  # nph: the child's own, read from its first bytes

    def frame(self, data: bytes | memoryview) -> bytes | memoryview:
        self.sent += len(data)
        return data

    def last(self, exit_code: int | None) -> bytes:
        return self.held

    def short(self) -> Failure | None:
        return None

    def _broken(self, error: str) -> Broken:
        self.failure = Failure("bad_gateway", error)
        return Broken(error)


class LengthWriter(Writer):
    """The child's Content-Length: more is a failure, less at its end is one; the last byte waits."""

    framing = "length"

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length
        self.written = 0  # by the child: what was sent and the byte held

    def frame(self, data: bytes | memoryview) -> bytes | memoryview:
        if len(data) > self.length - self.written:
            raise self._broken(f"the command wrote more than its Content-Length {self.length}")
        self.written += len(data)
        if data and self.written == self.length:  # the response would be complete: its last byte waits
            data, self.held = data[:-1], bytes(data[-1:])
        self.sent += len(data)
        return data

    def short(self) -> Failure | None:
        if self.written == self.length:
            return None
        self.failure = Failure("bad_gateway", f"the command wrote {self.written} of its Content-Length {self.length}")
        return self.failure


class ChunkedWriter(Writer):
    """A chunk per write; the last chunk (and the exit as a trailer) only on a clean end."""

    framing = "chunked"

    def __init__(self, trailers: bool) -> None:
        super().__init__()
        self.trailers = trailers

    def frame(self, data: bytes | memoryview) -> bytes | memoryview:
        self.sent += len(data)
        return b"".join((b"%x\r\n" % len(data), data, b"\r\n"))  # one copy of the chunk

    def last(self, exit_code: int | None) -> bytes:
        trailer = f"{EXIT_FIELD}: {exit_code}\r\n" if self.trailers else ""
        return f"0\r\n{trailer}\r\n".encode()


class UntilClose(Writer):
    """HTTP/1.0 without a Content-Length: the body ends with the connection."""

    framing = "close"
    keeps = False


class NoBody(Writer):
    """HEAD, 204, 304: the head is the whole response (the child's body is read and dropped)."""

    framing = "none"
    drops = True

    def frame(self, data: bytes | memoryview) -> bytes | memoryview:
        return b""


class Passthrough(Writer):
    """nph: the child's own status line and head, then its body, until the connection ends; the
    status is read from its first bytes, for the log. A HEAD request's is dropped whole."""

    framing = "close"
    keeps = False

    def __init__(self, drops: bool) -> None:
        super().__init__()
        self.drops = drops

    def frame(self, data: bytes | memoryview) -> bytes | memoryview:
        if not self.sent and data:
            code = bytes(data[9:12])
            self.status = int(code) if bytes(data[:5]) == b"HTTP/" and code.isdigit() else None
        return super().frame(data)


class Response:
    """One request's response: its head (or gsrv's own answer) and then its body through the
    writer chosen with the head. A pump Sink for the child's output (`dropping`, `room`,
    `write`)."""

    __slots__ = ("send", "version", "method", "trailers", "close_after", "status", "writer", "unsent", "began")

    def __init__(self, send: Send, version: str, method: str, trailers: bool, close_after: bool) -> None:
        self.send, self.version, self.method, self.trailers = send, version, method, trailers
        self.close_after = close_after  # the head says Connection: close
        self.status: int | None = None  # the status sent
        self.writer: Writer | None = None  # chosen with the head
        self.unsent = b""  # the head, until the body's first bytes go out with it (one send)
        self.began = False  # a head went out (or, nph, the child's first bytes)

    def begin(self, head: Head) -> None:
        """Write the head (sent with the first body bytes, or by `flush`); choose the framing."""
        drops = head.status in NO_BODY or self.method == "HEAD"
        writer: Writer
        if drops:
            writer = NoBody()
        elif head.length is not None:
            writer = LengthWriter(head.length)
        elif self.version == "1.1":
            writer = ChunkedWriter(self.trailers)
        else:
            writer, self.close_after = UntilClose(), True
        framing = "length" if drops and head.length is not None else writer.framing  # a HEAD's length is told
        data = head_bytes(self.version, head, framing, self.close_after, self.trailers)
        if drops or head.length == 0:  # complete at its head: the last byte waits for the verdict
            data, writer.held = data[:-1], data[-1:]
        self.status, self.writer, self.unsent, self.began = head.status, writer, data, True

    def pass_through(self) -> None:
        """nph: the child writes the whole response (it began once its first bytes went out)."""
        self.writer, self.close_after = Passthrough(self.method == "HEAD"), True

    def own(self, status: int, data: bytes) -> float:
        """gsrv's own response instead of the child's (no head went out): the connection ends after it."""
        self.status, self.close_after = status, True
        return self._send(data)

    @property
    def keeps(self) -> bool:
        """Complete and framed: the connection may carry the next request."""
        return self.writer is not None and self.writer.keeps and not self.close_after

    @property
    def failure(self) -> Failure | None:
        return self.writer.failure if self.writer is not None else None

    # -- the body, as the pump's sink --------------------------------------------------------

    @property
    def dropping(self) -> bool:
        return self.writer is not None and self.writer.drops

    def room(self, meter: Meter, chunk: int) -> int:
        return chunk

    def write(self, data: bytes | memoryview) -> float:
        assert self.writer is not None, "a body before its head"
        framed = self.writer.frame(data)
        if not framed:
            return 0.0
        if not self.began:  # nph: the child's first bytes are its status line
            self.began, self.status = True, self.writer.status
        return self._send(framed)

    def close(self) -> None:
        pass

    def flush(self) -> float:
        """The head, if it still waits for body bytes to go with."""
        return self._send(b"") if self.unsent else 0.0

    def end(self, exit_code: int | None) -> float:
        """A clean end: what completes the response (the held byte, the last chunk)."""
        assert self.writer is not None
        return self._send(self.writer.last(exit_code))

    def _send(self, data: bytes | memoryview) -> float:
        if self.unsent:
            data, self.unsent = self.unsent + data, b""
        return self.send(data) if data else 0.0
