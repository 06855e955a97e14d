"""Log lines (logfmt or JSON) and the non-blocking writer that puts them on stderr.

A stalled log reader must never stall the relay: lines wait in a bounded queue, the
overflow is dropped and counted, and one greenlet writes to a non-blocking descriptor.
"""

from __future__ import annotations

import collections
import io
import json
import os
import re
import stat
import threading
import time
from typing import Any

import gevent
from gevent.event import Event
from gevent.socket import wait_read, wait_write

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
QUEUE_BYTES = 4 * 1024 * 1024
PIPE_BUF = 4096  # lines written together at most: one write to a pipe this size is never split by another's
STDERR_TEXT_MAX = 4096  # one `stderr` line's text: a traceback's last 4 KiB


_second: list[object] = [-1, ""]  # the last second formatted, and its text: most lines share one


def timestamp(now: float) -> str:
    second = int(now)
    if _second[0] != second:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{int(now * 1000) % 1000:03d}Z"


_QUOTE = re.compile(r'[ "=\\]')  # and anything not printable


def _logfmt_value(value: object) -> str:
    if type(value) is int or type(value) is float:
        return str(value)  # never a space, a quote or an equals sign (nan and inf included)
    text = str(value)
    if text and text.isprintable() and not _QUOTE.search(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def format_line(fmt: str, level: str, event: str, fields: dict[str, Any], now: float) -> str:
    """One log line, without its newline; `fields` keep their order."""
    record: dict[str, Any] = {"ts": timestamp(now), "level": level, "event": event}
    record.update((k, v) for k, v in fields.items() if v is not None)
    if fmt == "json":
        return json.dumps(record, ensure_ascii=False, default=str)
    return " ".join(f"{k}={_logfmt_value(v)}" for k, v in record.items())


def _own_description(fd: int) -> int:
    """A descriptor for fd's target that we may make non-blocking without touching others.

    O_NONBLOCK belongs to the open file description, which a pipe or terminal shares with
    other processes; reopening /proc/self/fd/N gives gsrv a description of its own.
    Regular files never stall a writer, so they are used as they are.
    """
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_APPEND)
            return own
        except OSError:
            pass
    return os.dup(fd)


class Log:
    """Structured event log: `log.info("session_end", service=..., ...)`."""

    def __init__(self, fd: int = 2, level: str = "info", fmt: str = "text") -> None:
        self._fd = _own_description(fd)
        self.level = level
        self.fmt = fmt
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self.dropped = 0
        self._reported_drops = 0
        self._wake = Event()
        self._writer: gevent.Greenlet | None = None

    def configure(self, level: str, fmt: str) -> None:
        self.level, self.fmt = level, fmt

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= LEVELS[self.level]

    def event(self, level: str, event: str, **fields: Any) -> None:
        if not self.enabled(level):
            return
        line = (format_line(self.fmt, level, event, fields, time.time()) + "\n").encode("utf-8", "replace")
        if self._queued + len(line) > QUEUE_BYTES:
            self.dropped += 1
            return
        self._queue.append(line)
        self._queued += len(line)
        if self._writer is None:
            self._writer = gevent.spawn(self._write_loop)
        self._wake.set()

    def debug(self, event: str, **fields: Any) -> None:
        self.event("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.event("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.event("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.event("error", event, **fields)

    def _write_loop(self) -> None:
        while True:
            self._wake.clear()
            if self.dropped > self._reported_drops and self._queued < QUEUE_BYTES // 2:
                count, self._reported_drops = self.dropped - self._reported_drops, self.dropped
                self.warning("log_dropped", lines=count, next="logging_resumed")
            while self._queue:
                self._write_some()
            self._wake.wait()

    def _write_some(self, wait_timeout: float | None = None) -> None:
        queue = self._queue
        if len(queue) > 1 and len(queue[0]) + len(queue[1]) <= PIPE_BUF:  # lines queued together: one write
            size, lines = 0, []
            while queue and size + len(queue[0]) <= PIPE_BUF:
                size += len(queue[0])
                lines.append(queue.popleft())
            queue.appendleft(b"".join(lines))
        line = queue[0]
        try:
            written = os.write(self._fd, line)
        except BlockingIOError:
            wait_write(self._fd, timeout=wait_timeout)
            return
        except OSError:  # (EINTR is retried by Python itself, PEP 475)
            self._queue.clear()  # the log target is gone; nothing can be written any more
            self._queued = 0
            return
        self._queued -= written
        if written == len(line):
            self._queue.popleft()
        else:
            self._queue[0] = line[written:]

    def handed_over(self) -> list[str]:
        """An upgrade's exec: the lines not written yet, taken out of the queue (the record
        carries them; the new code writes them first)."""
        lines = [line.decode("utf-8", "replace") for line in self._queue]
        self._queue.clear()
        self._queued = 0
        return lines

    def take_over(self, lines: list[str]) -> None:
        """The lines the previous code had not written, before any of this code's."""
        for line in lines:
            data = line.encode("utf-8", "replace")
            self._queue.append(data)
            self._queued += len(data)
        if lines and self._writer is None:
            self._writer = gevent.spawn(self._write_loop)
        self._wake.set()

    def flush(self, timeout: float = 1.0) -> None:
        """Write what is queued, for at most `timeout` seconds (used at exit)."""
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            try:
                self._write_some(wait_timeout=max(0.0, deadline - time.monotonic()))
            except OSError:
                break


class ErrorStream(io.TextIOBase):
    """gsrv's own stderr while it serves (sys.stderr and gevent's hub.exception_stream): what
    Python or gevent would write to fd 2 (the hub's report of a greenlet that raised, a
    warning) becomes one `stderr` error line per report, queued on the log, never a blocking
    write. A report's pieces written in one turn of the loop make one line; a write from
    another thread is handed to the loop's thread."""

    def __init__(self, log: Log) -> None:
        self._log = log
        self._parts: list[str] = []
        self._size = 0
        self._loop = gevent.get_hub().loop
        self._thread = threading.get_ident()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if threading.get_ident() != self._thread:
            self._loop.run_callback_threadsafe(self.write, text)
            return len(text)
        if not self._parts:
            self._loop.run_callback(self._emit)
        self._parts.append(text)
        self._size += len(text)
        if self._size > 2 * STDERR_TEXT_MAX:  # keep the end: a traceback's last frames and its error
            kept = "".join(self._parts)[-STDERR_TEXT_MAX:]
            self._parts, self._size = [kept], len(kept)
        return len(text)

    def _emit(self) -> None:
        text, self._parts, self._size = "".join(self._parts).strip(), [], 0
        if text:
            self._log.error("stderr", process="gsrv", text=text[-STDERR_TEXT_MAX:])


def log_lines_from(fd: int, log: Log, process: str) -> gevent.Greenlet:
    """A helper process's stderr (gsrv's spawner, its guardian) is a pipe gsrv reads: each
    line a `stderr` error line, so nothing of theirs reaches fd 2 but through the log. The
    greenlet closes `fd` at the pipe's end."""
    os.set_blocking(fd, False)
    return gevent.spawn(_log_lines, fd, log, process)


def _log_lines(fd: int, log: Log, process: str) -> None:
    partial = b""
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                wait_read(fd)
                continue
            if not data:
                break
            *lines, partial = (partial + data).split(b"\n")
            partial = partial[:STDERR_TEXT_MAX]
            for line in lines:
                log.error("stderr", process=process, text=line[:STDERR_TEXT_MAX].decode("utf-8", "replace"))
        if partial:
            log.error("stderr", process=process, text=partial.decode("utf-8", "replace"))
    except OSError:
        pass
    finally:
        os.close(fd)
