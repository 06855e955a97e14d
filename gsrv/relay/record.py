"""A session recorded as an asciicast v2 file (`record = DIR`): a header line, then one JSON
event per line, `[seconds, "o", text]` for output, `"i"` for input (with `record_input`), `"r"`
for a resize. The bytes are decoded as UTF-8 as a stream, with U+FFFD for what is not (asciicast
is text). Writes run off the event loop (gevent's thread pool), a batch at a time, behind a
bounded queue: a recording that cannot keep up, reaches `record_max` or cannot be written is
cut at an event boundary and says why once; the session goes on whatever happens to it.
"""

from __future__ import annotations

import codecs
import json
import os
import time
from collections.abc import Callable

from gevent import get_hub

from gsrv.relay.pump import Meter, Sink, Source

QUEUE_MAX = 1024 * 1024  # encoded events waiting for the writer: more, and the recording is cut
WIDTH, HEIGHT = 80, 24  # the header's size until the client says another (a new pty is 0x0)


class Recording:
    """One session's file; `cut` (the reason) once it stopped recording."""

    def __init__(self, directory: str, sid: str, limit: int, record_input: bool,
                 on_cut: Callable[[str, str], None]) -> None:  # fmt: skip
        self.path = os.path.join(directory, f"{sid}.cast")
        self.limit, self.record_input, self.on_cut = limit, record_input, on_cut
        self.started = time.monotonic()
        self.cut: str | None = None
        self.written = 0  # bytes queued for the file so far (the header included)
        self._queue: list[bytes] = []
        self._queued = 0
        self._writing = False
        self._fd = -1
        self._closing = False
        self._decoders = {kind: codecs.getincrementaldecoder("utf-8")("replace") for kind in "oi"}
        header = {"version": 2, "width": WIDTH, "height": HEIGHT, "timestamp": int(time.time()),
                  "env": {"TERM": os.environ.get("TERM", "xterm-256color")}}  # fmt: skip
        self._add(json.dumps(header).encode() + b"\n")

    def output(self, data: bytes | memoryview) -> None:
        self._event("o", self._decoders["o"].decode(bytes(data)))

    def input(self, data: bytes | memoryview) -> None:
        if self.record_input:
            self._event("i", self._decoders["i"].decode(bytes(data)))

    def resize(self, columns: int, rows: int) -> None:
        self._event("r", f"{columns}x{rows}")

    def close(self) -> None:
        """The session ended: what is queued is written, then the file closed (off the loop)."""
        self._closing = True
        self._flush()

    def log_fields(self) -> dict[str, object]:
        return {"record": self.path, "record_cut": self.cut}

    def _event(self, kind: str, text: str) -> None:
        if self.cut is None and text:
            line = json.dumps([round(time.monotonic() - self.started, 6), kind, text]).encode() + b"\n"
            self._add(line)

    def _add(self, line: bytes) -> None:
        if self.written + len(line) > self.limit:
            self._stop("record_max")
        elif self._queued + len(line) > QUEUE_MAX:
            self._stop("fell_behind")
        else:
            self._queue.append(line)
            self._queued += len(line)
            self.written += len(line)
            self._flush()

    def _stop(self, why: str, error: str = "") -> None:
        if self.cut is None:
            self.cut = why
            self.on_cut(why, error)

    def _flush(self) -> None:
        """Hand what is queued to a pool thread, unless a batch is being written."""
        if self._writing or (not self._queue and not self._closing):
            return
        batch, self._queue, self._queued = self._queue, [], 0
        self._writing = True
        result = get_hub().threadpool.spawn(self._write, batch, self._closing)
        result.rawlink(self._written)

    def _write(self, batch: list[bytes], closing: bool) -> str:
        """In a pool thread: the batch appended (the file made 0600 first); "" or the error."""
        try:
            if self._fd < 0 and batch:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            for line in batch:
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view) :]
            return ""
        except OSError as e:
            return f"{self.path}: {e.strerror or e}"
        finally:
            if closing and self._fd >= 0:
                os.close(self._fd)
                self._fd = -2

    def _written(self, result: object) -> None:
        self._writing = False
        error = getattr(result, "value", "") or ""
        if error:
            self._stop("write_failed", error)
            self._queue.clear()
            self._queued = 0
        if self._fd != -2:
            self._flush()


class RecordedSource:
    """A Source whose bytes are recorded as they are read (the child's output)."""

    __slots__ = ("inner", "record")

    def __init__(self, inner: Source, record: Callable[[bytes | memoryview], None]) -> None:
        self.inner, self.record = inner, record

    def read(self, limit: int) -> memoryview | bytes:
        data = self.inner.read(limit)
        if data:
            self.record(data)
        return data

    def done(self) -> None:
        self.inner.done()

    def close(self) -> None:
        self.inner.close()


class RecordedSink:
    """A Sink whose bytes are recorded as they are written (the client's input)."""

    __slots__ = ("inner", "record")

    def __init__(self, inner: Sink, record: Callable[[bytes | memoryview], None]) -> None:
        self.inner, self.record = inner, record

    @property
    def dropping(self) -> bool:
        return self.inner.dropping

    def room(self, meter: Meter, chunk: int) -> int:
        return self.inner.room(meter, chunk)

    def write(self, data: memoryview | bytes) -> float:
        self.record(data)
        return self.inner.write(data)

    def close(self) -> None:
        self.inner.close()
