"""The relay primitive: one direction of one session, fd to fd, in bounded memory.

Two paths behind one shape, `copy` and `splice`, each returning why it stopped (End).
- splice: splice(2) between the socket and the child's pipe; the bytes never enter
  userland, so a session holds no buffer at all. Linux only.
- copy: one loop over non-blocking fds (a socket fd reads and writes like a pipe end).
  It takes a buffer from a shared pool only for the moment it moves bytes: a pump
  waiting for its source holds none, and reused buffers cost no page faults.
Both yield every ~1 MiB so a hot session cannot starve the others.
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
from collections.abc import Callable

import gevent
from gevent import get_hub

from gsrv.edge.tls import TlsStream

YIELD_EVERY = 1024 * 1024
SPLICE_MAX = 1024 * 1024  # per call; a pipe's capacity caps it anyway
HAS_SPLICE = hasattr(os, "splice")
PIPE_BUF = 4096
POOL_KEEP = 32  # free buffers kept per chunk size; more are left to the allocator
READ, WRITE = 1, 2


class End(enum.Enum):
    """Why a pump stopped."""

    SOURCE_EOF = "source_eof"
    SOURCE_ERROR = "source_error"
    SINK_CLOSED = "sink_closed"


class Meter:
    """What one direction has moved, when it last moved, and whether it holds a chunk now."""

    __slots__ = ("total", "last", "holding", "blocked", "reported", "reported_blocked")

    def __init__(self) -> None:
        self.total = 0
        self.last = time.monotonic()
        self.holding = False
        self.blocked = 0.0  # seconds spent waiting for the sink to take bytes
        self.reported = 0  # what the metrics have been told of (see metrics.flush)
        self.reported_blocked = 0.0

    def moved(self, n: int) -> None:
        self.total += n
        self.last = time.monotonic()
        self.holding = False


class Fd:
    """A non-blocking fd with one io watcher kept for the pump's life (cheaper than the new
    watcher per wait that gevent.socket.wait_read/wait_write make). close() before the fd."""

    def __init__(self, fd: int, events: int) -> None:
        self.fd = fd
        self._hub = get_hub()
        self._watcher = self._hub.loop.io(fd, events)

    def wait(self) -> None:
        self._hub.wait(self._watcher)

    def close(self) -> None:
        self._watcher.close()

    def write_all(self, data: memoryview | bytes) -> float:
        """Write all of data, waiting cooperatively; returns the seconds it waited.
        Raises OSError (EPIPE: the reader is gone)."""
        view = memoryview(data)
        waited = 0.0
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                started = time.monotonic()
                self.wait()
                waited += time.monotonic() - started
        return waited

    def read(self, size: int) -> bytes:
        """Up to size bytes once readable; b"" at EOF. Takes no buffer while it waits."""
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                self.wait()


class BufferPool:
    """Reused chunk buffers shared by all pumps with one chunk size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.size)

    def give(self, buf: bytearray) -> None:
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


class _PipeRoom:
    """Sizes reads by the room left in the sink pipe, so a pump whose child stops reading
    waits on the pipe with no chunk in hand."""

    def __init__(self, fd: int, chunk: int) -> None:
        self.fd = fd
        try:
            self.capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        except OSError:
            self.capacity = chunk  # not a pipe: whole chunks

    def room(self) -> int:
        return self.capacity - queued(self.fd)


def copy(
    src: int, dst: int, chunk: int, meter: Meter, sink_is_pipe: bool = False, yield_every: int = YIELD_EVERY
) -> End:
    """Move bytes src -> dst until src's EOF (or error) or dst closes; returns why it stopped."""
    source, sink = Fd(src, READ), Fd(dst, WRITE)
    try:
        return _copy(source, sink, chunk, meter, _PipeRoom(dst, chunk) if sink_is_pipe else None, yield_every)
    finally:
        source.close()
        sink.close()


def _copy(source: Fd, sink: Fd, chunk: int, meter: Meter, pipe: _PipeRoom | None, yield_every: int) -> End:
    buffers = pool(chunk)
    since_yield = 0
    while True:
        size = chunk
        if pipe is not None:
            size = min(chunk, pipe.room())
            if size < PIPE_BUF:
                started = time.monotonic()
                sink.wait()
                meter.blocked += time.monotonic() - started
                size = min(chunk, max(PIPE_BUF, pipe.room()))
        buf = buffers.take()
        try:
            n = os.readv(source.fd, [memoryview(buf)[:size]])
        except BlockingIOError:
            buffers.give(buf)
            source.wait()
            continue
        except OSError:
            return End.SOURCE_ERROR
        if n == 0:
            buffers.give(buf)
            return End.SOURCE_EOF
        meter.holding = True
        try:
            meter.blocked += sink.write_all(memoryview(buf)[:n])
        except OSError:
            return End.SINK_CLOSED
        buffers.give(buf)
        meter.moved(n)
        since_yield += n
        if since_yield >= yield_every:
            since_yield = 0
            gevent.sleep(0)


def splice(src: int, dst: int, meter: Meter, source_is_socket: bool, yield_every: int = YIELD_EVERY) -> End:
    """Move bytes src -> dst with splice(2), one side being a pipe, until src's EOF (or
    error) or dst closes. Nothing is held in userland: while one side waits, the bytes sit
    in the kernel's socket and pipe buffers, as they would with the copy path."""
    source, sink = Fd(src, READ), Fd(dst, WRITE)
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    count = min(SPLICE_MAX, yield_every)
    since_yield = 0
    source_ended = False
    try:
        while True:
            try:
                n = os.splice(src, dst, count, flags=flags)
            except BlockingIOError:
                # Either side may be the one that is not ready: bytes waiting at the source
                # mean the sink is full. A source readable with nothing queued is at its end
                # (or holds an error), which splice reports only once the sink has room: if
                # it still says EAGAIN then, wait for the sink, or the loop would spin.
                if source_ended or queued(src):
                    started = time.monotonic()
                    sink.wait()
                    meter.blocked += time.monotonic() - started
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
            meter.moved(n)
            since_yield += n
            if since_yield >= yield_every:
                since_yield = 0
                gevent.sleep(0)
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


def discard(src: int, chunk: int, meter: Meter) -> End:
    """Read and drop input (the child no longer reads) until EOF or an error; like _copy, it
    holds a buffer only while reading, none while it waits."""
    source = Fd(src, READ)
    buffers = pool(chunk)
    try:
        while True:
            buf = buffers.take()
            try:
                n = os.readv(src, [buf])
            except BlockingIOError:
                n = -1
            except OSError:
                return End.SOURCE_ERROR
            finally:
                buffers.give(buf)
            if n == 0:
                return End.SOURCE_EOF
            if n < 0:
                source.wait()
            else:
                meter.moved(n)
    finally:
        source.close()


def pump_in(stream: TlsStream, stdin: int, chunk: int, meter: Meter) -> End:
    """Client to child through TLS: SOURCE_EOF at the client's close_notify."""
    sink = Fd(stdin, WRITE)
    try:
        return _move(lambda: stream.recv(chunk), sink.write_all, meter)
    finally:
        sink.close()


def pump_out(stdout: int, stream: TlsStream, chunk: int, meter: Meter) -> End:
    """Child to client through TLS: SOURCE_EOF at the child's EOF (the session then sends
    close_notify). After a TLS 1.2 client's close_notify (both ways closed) the child's
    output is read and dropped, so the child can finish."""
    source = Fd(stdout, READ)
    try:
        return _move(lambda: source.read(chunk), stream.send, meter, dropping=lambda: stream.closed)
    finally:
        source.close()


def _move(
    read: Callable[[], bytes],
    write: Callable[[bytes], float],
    meter: Meter,
    dropping: Callable[[], bool] = lambda: False,
) -> End:
    """One direction: read, write all of it (write returns the seconds it waited), yield
    every YIELD_EVERY bytes. ssl.SSLError is an OSError: either side's errors end it."""
    since_yield = 0
    while True:
        try:
            data = read()
        except OSError:
            return End.SOURCE_ERROR
        if not data:
            return End.SOURCE_EOF
        if dropping():
            continue
        meter.holding = True
        try:
            meter.blocked += write(data)
        except OSError:
            return End.SINK_CLOSED
        meter.moved(len(data))
        since_yield += len(data)
        if since_yield >= YIELD_EVERY:
            since_yield = 0
            gevent.sleep(0)
