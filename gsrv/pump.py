"""The copy primitive: one direction of one session, at most one chunk held, yielding every ~1 MiB.

A pump takes no buffer while its source has nothing to read: a read that would block
releases its buffer at once and the greenlet waits for readability holding nothing.
"""

from __future__ import annotations

import enum
import fcntl
import os
import struct
import termios
import time

import gevent
from gevent import get_hub
from gevent.socket import socket

YIELD_EVERY = 1024 * 1024
PIPE_BUF = 4096


class End(enum.Enum):
    """Why a pump stopped."""

    SOURCE_EOF = "source_eof"
    SOURCE_ERROR = "source_error"
    SINK_CLOSED = "sink_closed"


class Meter:
    """What one direction has moved, when it last moved, and whether it holds a chunk now."""

    __slots__ = ("total", "last", "holding")

    def __init__(self) -> None:
        self.total = 0
        self.last = time.monotonic()
        self.holding = False

    def moved(self, n: int) -> None:
        self.total += n
        self.last = time.monotonic()
        self.holding = False


class Pipe:
    """A non-blocking pipe end with one io watcher kept for the pump's life (cheaper than a
    new watcher per wait, as gevent.socket.wait_read/wait_write make)."""

    def __init__(self, fd: int, writing: bool) -> None:
        self.fd = fd
        self._hub = get_hub()
        self._watcher = self._hub.loop.io(fd, 2 if writing else 1)

    def wait(self) -> None:
        self._hub.wait(self._watcher)

    def close(self) -> None:
        self._watcher.close()

    def write_all(self, data: bytes) -> None:
        """Write all of data, waiting cooperatively; raises OSError (EPIPE: the reader is gone)."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                self.wait()

    def read(self, size: int) -> bytes:
        """Up to size bytes once readable; b"" at EOF. Takes no buffer while it waits."""
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                self.wait()


def queued(fd: int, request: int = termios.FIONREAD) -> int:
    """Bytes waiting in a pipe (FIONREAD) or a socket's send queue (TIOCOUTQ); 0 if unknown."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0])
    except OSError:
        return 0


def pipe_room(fd: int, capacity: int) -> int:
    """Bytes a pipe can take now: its capacity less what the reader has not read yet."""
    return capacity - queued(fd)


def socket_to_fd(sock: socket, fd: int, chunk: int, meter: Meter) -> End:
    """Client -> child stdin until the client's EOF, a client error, or the child stops reading.

    It reads from the client only what the pipe has room for, so a child that stops
    reading leaves this pump waiting on the pipe with no chunk in hand.
    """
    pipe = Pipe(fd, writing=True)
    try:
        return _socket_to_pipe(sock, pipe, chunk, meter)
    finally:
        pipe.close()


def _socket_to_pipe(sock: socket, pipe: Pipe, chunk: int, meter: Meter) -> End:
    since_yield = 0
    try:
        capacity = fcntl.fcntl(pipe.fd, fcntl.F_GETPIPE_SZ)
    except OSError:
        capacity = chunk  # not a pipe: read whole chunks
    while True:
        room = pipe_room(pipe.fd, capacity)
        if room < PIPE_BUF:
            pipe.wait()
            room = max(PIPE_BUF, pipe_room(pipe.fd, capacity))
        try:
            data = sock.recv(min(chunk, room))
        except OSError:
            return End.SOURCE_ERROR
        if not data:
            return End.SOURCE_EOF
        meter.holding = True
        try:
            pipe.write_all(data)
        except OSError:
            return End.SINK_CLOSED
        n = len(data)
        del data  # hold nothing while waiting for the next read
        meter.moved(n)
        since_yield += n
        if since_yield >= YIELD_EVERY:
            since_yield = 0
            gevent.sleep(0)


def fd_to_socket(fd: int, sock: socket, chunk: int, meter: Meter) -> End:
    """Child stdout -> client until the child's EOF, a read error, or a client error."""
    pipe = Pipe(fd, writing=False)
    try:
        return _pipe_to_socket(pipe, sock, chunk, meter)
    finally:
        pipe.close()


def _pipe_to_socket(pipe: Pipe, sock: socket, chunk: int, meter: Meter) -> End:
    since_yield = 0
    while True:
        try:
            data = pipe.read(chunk)
        except OSError:
            return End.SOURCE_ERROR
        if not data:
            return End.SOURCE_EOF
        meter.holding = True
        try:
            sock.sendall(data)
        except OSError:
            return End.SINK_CLOSED
        n = len(data)
        del data  # hold nothing while waiting for the next read
        meter.moved(n)
        since_yield += n
        if since_yield >= YIELD_EVERY:
            since_yield = 0
            gevent.sleep(0)


def discard(sock: socket, chunk: int, meter: Meter) -> End:
    """Read and drop client input (the child no longer reads) until EOF or an error."""
    while True:
        try:
            data = sock.recv(chunk)
        except OSError:
            return End.SOURCE_ERROR
        if not data:
            return End.SOURCE_EOF
        meter.moved(len(data))
        del data
