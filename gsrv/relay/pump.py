"""Moving bytes, one direction at a time, in bounded memory: the one loop (`move`), the kernel's
own (`splice`), and the sources and sinks they move between.

- move: read a chunk from a Source, write all of it to a Sink. A source takes a buffer from
  a shared pool only for the moment it moves bytes: a direction waiting for its source holds
  none, and reused buffers cost no page faults. Copy, TLS, discarding input, child stderr
  and the lingering close are each a source and a sink given to it.
- splice: splice(2) between a socket and a pipe; the bytes never enter userland. Linux only.
Both count into a Meter (bytes, last activity, time blocked on the sink) and yield to the
loop every ~1 MiB, so a hot session cannot starve the others.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import socket as stdsocket
import struct
import termios
import time
from typing import Protocol

import gevent
from gevent import get_hub

from gsrv.loop import READ, WRITE

YIELD_EVERY = 1024 * 1024
SPLICE_MAX = 1024 * 1024  # per call; a pipe's capacity caps it anyway
HAS_SPLICE = hasattr(os, "splice")
PIPE_BUF = 4096
POOL_KEEP = 32  # free buffers kept per chunk size; more are left to the allocator


class End(enum.Enum):
    """Why a direction stopped."""

    SOURCE_EOF = "source_eof"
    SOURCE_ERROR = "source_error"
    SINK_CLOSED = "sink_closed"


class Meter:
    """What one direction has moved, when it last moved, how long it waited for its sink, and
    whether it holds a chunk now."""

    __slots__ = ("total", "last", "holding", "blocked", "reported", "reported_blocked", "yield_every", "_since_yield")

    def __init__(self, yield_every: int = YIELD_EVERY) -> None:
        self.total = 0
        self.last = time.monotonic()
        self.holding = False
        self.blocked = 0.0  # seconds spent waiting for the sink to take bytes
        self.reported = 0  # what the metrics have been told of (see metrics.flush)
        self.reported_blocked = 0.0
        self.yield_every = yield_every
        self._since_yield = 0

    def moved(self, n: int) -> None:
        """n bytes reached the sink; yields to the loop every yield_every bytes."""
        self.total += n
        self.last = time.monotonic()
        self.holding = False
        self._since_yield += n
        if self._since_yield >= self.yield_every:
            self._since_yield = 0
            gevent.sleep(0)

    def dropped(self, n: int) -> None:
        """n bytes were read and dropped (the sink takes no more): not counted, but they
        count towards the next yield like any others."""
        self._since_yield += n
        if self._since_yield >= self.yield_every:
            self._since_yield = 0
            gevent.sleep(0)


class Fd:
    """A non-blocking fd with one io watcher kept for its life (cheaper than the new watcher
    per wait that gevent.socket.wait_read/wait_write make). close() before the fd.
    (Slots here and below: every session holds several of these for as long as it runs.)"""

    __slots__ = ("fd", "_hub", "_watcher")

    def __init__(self, fd: int, events: int) -> None:
        self.fd = fd
        self._hub = get_hub()
        self._watcher = self._hub.loop.io(fd, events)

    def wait(self, timeout: float | None = None) -> None:
        """Until the fd is ready; raises TimeoutError after timeout seconds, if given."""
        if timeout is None:
            self._hub.wait(self._watcher)
            return
        with gevent.Timeout(timeout, TimeoutError):
            self._hub.wait(self._watcher)

    def timed_wait(self) -> float:
        """Wait until ready; the seconds it took (a sink's wait is backpressure)."""
        started = time.monotonic()
        self._hub.wait(self._watcher)
        return time.monotonic() - started

    def close(self) -> None:
        self._watcher.close()

    def write_all(self, data: memoryview | bytes) -> float:
        """Write all of data, waiting cooperatively; returns the seconds it waited. Raises
        OSError (EPIPE: the reader is gone). A pipe write can be short: loop over a view."""
        view = memoryview(data)
        waited = 0.0
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                waited += self.timed_wait()
        return waited

    def read(self, size: int) -> bytes:
        """Up to size bytes once readable; b"" at EOF. Takes no buffer while it waits."""
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                self.wait()


class BufferPool:
    """Reused chunk buffers shared by all directions with one chunk size, each kept as one
    writable view over its bytearray (so no read makes a new view of a buffer)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[memoryview] = []

    def take(self) -> memoryview:
        return self._free.pop() if self._free else memoryview(bytearray(self.size))

    def give(self, buf: memoryview) -> None:
        if len(self._free) < POOL_KEEP:
            self._free.append(buf)


_pools: dict[int, BufferPool] = {}


def pool(size: int) -> BufferPool:
    found = _pools.get(size)
    if found is None:
        found = _pools[size] = BufferPool(size)
    return found


def queued(fd: int, request: int = termios.FIONREAD) -> int:
    """Bytes waiting in a pipe (FIONREAD) or a socket's send queue (TIOCOUTQ); 0 if unknown."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0])
    except OSError:
        return 0


class Source(Protocol):
    def read(self, limit: int) -> memoryview | bytes:
        """Up to limit bytes once there are some; b"" at the end. Raises OSError."""

    def done(self) -> None:
        """The bytes last read were written: a pooled buffer goes back."""

    def close(self) -> None: ...


class Sink(Protocol):
    @property
    def dropping(self) -> bool:
        """It takes no more: read the source to its end and drop it, uncounted."""

    def room(self, meter: Meter, chunk: int) -> int:
        """How much to read now; waits (counted in meter.blocked) while there is no room."""

    def write(self, data: memoryview | bytes) -> float:
        """All of data; the seconds it waited. Raises OSError (the reader is gone)."""

    def close(self) -> None: ...


def move(source: Source, sink: Sink, meter: Meter, chunk: int) -> End:
    """Move bytes from source to sink until the source ends (or fails) or the sink closes.
    (The methods are bound once: at small reads this loop's own cost is what a copy costs.)"""
    room, read, done, write, moved = sink.room, source.read, source.done, sink.write, meter.moved
    try:
        while True:
            limit = room(meter, chunk)
            try:
                data = read(limit)
            except OSError:
                return End.SOURCE_ERROR
            n = len(data)
            if not n:
                return End.SOURCE_EOF
            if sink.dropping:
                done()
                meter.dropped(n)
                continue
            meter.holding = True
            try:
                meter.blocked += write(data)
            except OSError:
                return End.SINK_CLOSED
            done()
            moved(n)
    finally:
        source.close()
        sink.close()


class FdSource:
    """A non-blocking fd (socket or pipe) read into a pooled buffer."""

    __slots__ = ("_fd", "_pool", "_buf")

    def __init__(self, fd: int, chunk: int) -> None:
        self._fd = Fd(fd, READ)
        self._pool = pool(chunk)
        self._buf: memoryview | None = None

    def read(self, limit: int) -> memoryview:
        fd = self._fd.fd
        while True:
            buf = self._buf
            if buf is None:
                buf = self._buf = self._pool.take()
            try:
                n = os.readv(fd, [buf[:limit]])
                break
            except BlockingIOError:
                self.done()  # no buffer held while waiting
                self._fd.wait()
        return buf[:n]

    def done(self) -> None:
        if self._buf is not None:
            self._pool.give(self._buf)
            self._buf = None

    def close(self) -> None:
        self.done()
        self._fd.close()


class FdSink(Fd):
    """A non-blocking fd written whole; short writes (bufsize=0 pipes) loop over a view."""

    __slots__ = ()
    dropping = False
    write = Fd.write_all

    def __init__(self, fd: int) -> None:
        super().__init__(fd, WRITE)

    def room(self, meter: Meter, chunk: int) -> int:
        return chunk


class PipeSink(FdSink):
    """A child's stdin: reads are sized by the room left in the pipe, so a direction whose
    child stops reading waits on the pipe with no chunk in hand."""

    __slots__ = ("capacity",)

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        try:
            self.capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        except OSError:
            self.capacity = 0  # not a pipe: whole chunks

    def room(self, meter: Meter, chunk: int) -> int:
        if not self.capacity:
            return chunk
        size = min(chunk, self.capacity - queued(self.fd))
        if size >= PIPE_BUF:
            return size
        meter.blocked += self.timed_wait()
        return min(chunk, max(PIPE_BUF, self.capacity - queued(self.fd)))


class Discard:
    """Input nobody reads any more (the child closed its stdin): counted, then dropped."""

    __slots__ = ()
    dropping = False

    def room(self, meter: Meter, chunk: int) -> int:
        return chunk

    def write(self, data: memoryview | bytes) -> float:
        return 0.0

    def close(self) -> None:
        pass


def copy(src: int, dst: int, chunk: int, meter: Meter, sink_is_pipe: bool = False) -> End:
    """Move bytes between two fds through a pooled buffer (the copy relay's directions)."""
    return move(FdSource(src, chunk), PipeSink(dst) if sink_is_pipe else FdSink(dst), meter, chunk)


def splice(src: int, dst: int, meter: Meter, source_is_socket: bool, limit: int | None = None) -> End:
    """Move bytes src -> dst with splice(2), one side being a pipe, until src's EOF (or
    error) or dst closes, or `limit` bytes moved (an HTTP body's Content-Length: SOURCE_EOF).
    Nothing is held in userland: while one side waits, the bytes sit in the kernel's socket
    and pipe buffers, as they would with the copy path."""
    source, sink = Fd(src, READ), Fd(dst, WRITE)
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    count = min(SPLICE_MAX, meter.yield_every)
    left = limit
    source_ended = False
    try:
        while True:
            if left is not None:
                if left <= 0:
                    return End.SOURCE_EOF
                count = min(count, left)
            try:
                n = os.splice(src, dst, count, flags=flags)
            except BlockingIOError:
                # Either side may be the one that is not ready: bytes waiting at the source
                # mean the sink is full. A source readable with nothing queued is at its end
                # (or holds an error), which splice reports only once the sink has room: if
                # it still says EAGAIN then, wait for the sink, or the loop would spin.
                if source_ended or queued(src):
                    meter.blocked += sink.timed_wait()
                    source_ended = False
                else:
                    source.wait()
                    source_ended = not queued(src)
                continue
            except OSError as e:
                if not source_is_socket:
                    return End.SINK_CLOSED  # the client is gone
                if e.errno != errno.EPIPE:
                    return End.SOURCE_ERROR
                # The child closed its stdin. If the client had sent all it will, say so, as
                # the copy path (which reads before it writes) does.
                return End.SOURCE_EOF if _socket_at_eof(src) else End.SINK_CLOSED
            if n == 0:
                return End.SOURCE_EOF
            if left is not None:
                left -= n
            meter.moved(n)
    finally:
        source.close()
        sink.close()


def _socket_at_eof(fd: int) -> bool:
    """Whether the socket's peer has finished sending and nothing is left to read."""
    try:
        sock = stdsocket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return sock.recv(1, stdsocket.MSG_PEEK | stdsocket.MSG_DONTWAIT) == b""
    except OSError:
        return False
    finally:
        sock.detach()
