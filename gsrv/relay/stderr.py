"""Child stderr turned into log lines (`stderr = "log"`): each line capped at 4 KiB, at most
100 lines/s a session.

`StderrLines` is pure and socket-free: fed bytes and a clock, it returns the lines to log and
counts the drops, and says how long the reader should pause when a child writes faster than
the budget. `StderrLog` is the one owner of a session's stderr pipe: it reads it into
StderrLines and hands each line to the session's log.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import get_hub
from gevent.event import Event

from gsrv.loop import READ
from gsrv.relay.pump import Discard, FdSource, Meter, move

LINE_CAP = 4096
LINES_PER_S = 100
WAIT_S = 0.1  # after the child's exit: how long its last stderr lines may take to arrive
READ_CHUNK = 65536


class StderrLines:
    """Splits a byte stream into capped lines under a per-second budget (a token bucket)."""

    def __init__(self, cap: int = LINE_CAP, rate: int = LINES_PER_S) -> None:
        self.cap, self.rate = cap, rate
        self._partial = bytearray()
        self._skipping = False  # inside a line already cut at the cap
        self._tokens = float(rate)
        self._last = 0.0
        self.dropped = 0

    def feed(self, data: bytes, now: float) -> list[str]:
        lines: list[bytes] = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._skipping:
                room = self.cap - len(self._partial)
                self._partial += piece[:room]
                if len(piece) > room:
                    lines.append(bytes(self._partial) + b" [cut]")
                    self._partial.clear()
                    self._skipping = True
            if end < 0:
                break
            if not self._skipping:
                lines.append(bytes(self._partial))
            self._partial.clear()
            self._skipping = False
            start = end + 1
        return self._admit(lines, now)

    def pause(self) -> float:
        """Seconds until the budget has a line again: 0 while within it. The reader sleeps
        that long, so a child flooding stderr is slowed by its full pipe instead of costing
        gsrv a CPU to read and drop what it writes."""
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def finish(self, now: float) -> list[str]:
        """The unterminated last line at EOF, if any."""
        rest = [bytes(self._partial)] if self._partial else []
        self._partial.clear()
        return self._admit(rest, now)

    def _admit(self, lines: list[bytes], now: float) -> list[str]:
        self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
        self._last = now
        kept = []
        for line in lines:
            if self._tokens >= 1:
                self._tokens -= 1
                kept.append(line.decode("utf-8", "replace"))
            else:
                self.dropped += 1
        return kept


class StderrLog:
    """A session's child's stderr as its log lines: a watcher on the pipe until the child's
    first bytes there (a child that never writes to stderr costs no greenlet: a parked one is
    ~10 KB of a stalled session), then a reader greenlet under StderrLines' budget. The
    teardown's three steps, in its order: `last` (the last lines, the ladder's included, before
    the ladder), `end` (right after the ladder closed the pipe, before anything can yield: a
    freed fd number must not wake it), `tail` (an unterminated last line)."""

    __slots__ = ("line", "lines", "fd", "exited", "reader", "watch")

    def __init__(self, line: Callable[[str], None]) -> None:
        self.line = line  # one line to the log
        self.lines = StderrLines()
        self.fd = -1  # none: the child's stderr is not logged (or not yet)
        self.exited: Event | None = None
        self.reader: gevent.Greenlet | None = None
        self.watch: Any = None  # the pipe's watcher, until the child first writes there

    def open(self, fd: int, exited: Event) -> None:
        """The child's stderr pipe: watched from now on."""
        self.fd, self.exited = fd, exited
        self.watch = get_hub().loop.io(fd, READ)
        self.watch.start(self._read)

    @property
    def greenlets(self) -> list[gevent.Greenlet]:
        return [self.reader] if self.reader is not None else []

    @property
    def dropped(self) -> int:
        return self.lines.dropped

    def last(self) -> None:
        """Its last lines (and the ladder's) may not have woken the watcher yet."""
        if self.fd < 0:
            return
        self._read()
        if self.reader is not None and self.exited is not None and self.exited.is_set():
            self.reader.join(timeout=WAIT_S)

    def end(self) -> None:
        self._stop_watch()
        if self.reader is not None:
            self.reader.kill()

    def tail(self) -> None:
        for line in self.lines.finish(time.monotonic()):
            self.line(line)

    def _read(self) -> None:
        """The pipe is readable (or the teardown asks): what is there is read at once, and a
        reader greenlet takes over only while the child may write more (most children write
        nothing: their pipe's EOF then costs no greenlet)."""
        self._stop_watch()
        if self.reader is not None or self.fd < 0:
            return
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            data = None
        except OSError:  # as the reader's end at a read error: the lines so far stay
            data = b""
        if data == b"":  # EOF: the child and whatever shared its stderr are done with it
            self.fd = -1  # (the ladder closes it)
            return
        if data:
            for line in self.lines.feed(data, time.monotonic()):
                self.line(line)
        self.reader = gevent.spawn(move, FdSource(self.fd, READ_CHUNK), _Lines(self), Meter(), READ_CHUNK)

    def _stop_watch(self) -> None:
        if self.watch is not None:
            self.watch.stop()
            self.watch.close()
            self.watch = None


class _Lines(Discard):
    """The reader's sink: capped lines, under the budget; over it the reader waits (the
    child's full pipe then slows it) instead of spending a CPU reading and dropping."""

    __slots__ = ("log",)

    def __init__(self, log: StderrLog) -> None:
        self.log = log

    def write(self, data: memoryview | bytes) -> float:
        lines = self.log.lines
        for line in lines.feed(bytes(data), time.monotonic()):
            self.log.line(line)
        pause = lines.pause()
        gevent.sleep(pause)  # yields, always: a child flooding stderr must not starve the loop
        return pause
