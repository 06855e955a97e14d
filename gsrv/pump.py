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
from gevent.socket import socket, wait_read, wait_write

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


def write_fd(fd: int, data: bytes) -> None:
    """Write all of data to a non-blocking fd, waiting cooperatively; raises OSError."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            wait_write(fd)


def read_fd(fd: int, size: int) -> bytes:
    """Read up to size bytes from a non-blocking fd once it is readable; b"" at EOF."""
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            wait_read(fd)


def pipe_room(fd: int, capacity: int) -> int:
    """Bytes a pipe can take now: its capacity less what the reader has not read yet."""
    try:
        pending = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return capacity
    return int(capacity - pending)


def socket_to_fd(sock: socket, fd: int, chunk: int, meter: Meter) -> End:
    """Client -> child stdin until the client's EOF, a client error, or the child stops reading.

    It reads from the client only what the pipe has room for, so a child that stops
    reading leaves this pump waiting on the pipe with no chunk in hand.
    """
    since_yield = 0
    try:
        capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except OSError:
        capacity = chunk  # not a pipe: read whole chunks
    while True:
        room = pipe_room(fd, capacity)
        if room < PIPE_BUF:
            wait_write(fd)
            room = max(PIPE_BUF, pipe_room(fd, capacity))
        try:
            data = sock.recv(min(chunk, room))
        except OSError:
            return End.SOURCE_ERROR
        if not data:
            return End.SOURCE_EOF
        meter.holding = True
        try:
            write_fd(fd, data)
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
    since_yield = 0
    while True:
        try:
            data = read_fd(fd, chunk)
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
