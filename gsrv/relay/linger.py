"""The lingering close: after a FIN, the client's input read and dropped until its EOF, or until
LINGER_S after it last acknowledged reply bytes. Unread input at close() would make the kernel
reset the connection and discard reply bytes still queued for the client.
"""

from __future__ import annotations

import os
import socket as stdsocket
import termios
import time

from gsrv.loop import READ
from gsrv.relay.pump import Discard, Fd, Meter, move, pool, queued

LINGER_S = 2.0  # how long a closing session waits for the client's EOF once the reply is acked
LINGER_POLL_S = 0.1
LINGER_READ = 65536


def linger(fd: int) -> None:
    """The lingering close's read: the client's input read and dropped until its EOF, or until
    LINGER_S after it last acknowledged reply bytes (unread input at close() would make the
    kernel reset the connection and discard reply bytes still queued for the client)."""
    move(Lingering(fd), Discard(), Meter(), LINGER_READ)


def fin_and_linger(sock: stdsocket.socket, read_first: bool = True) -> None:
    """A clean end: a FIN after all output, the lingering read (unless the client's EOF came
    already), then close."""
    try:
        sock.shutdown(stdsocket.SHUT_WR)
    except OSError:
        sock.close()
        return
    if read_first:
        linger(sock.fileno())
    sock.close()


class Lingering:
    """The client's input during a lingering close: at its end after LINGER_S without the
    client acknowledging more of the reply (TIOCOUTQ, the unacknowledged send queue)."""

    def __init__(self, fd: int) -> None:
        self._fd = Fd(fd, READ)
        self._pool = pool(LINGER_READ)
        self._buf = self._pool.take()
        self._unsent = queued(fd, termios.TIOCOUTQ)
        self._deadline = time.monotonic() + LINGER_S

    def read(self, limit: int) -> memoryview:
        while True:
            left = self._deadline - time.monotonic()
            if left <= 0:
                return memoryview(b"")
            try:
                self._fd.wait(min(left, LINGER_POLL_S))
                n = os.readv(self._fd.fd, [self._buf[:limit]])
            except (TimeoutError, BlockingIOError):
                n = -1
            self._acked()
            if n >= 0:
                return self._buf[:n]

    def _acked(self) -> None:
        unsent = queued(self._fd.fd, termios.TIOCOUTQ)
        if unsent < self._unsent:
            self._deadline = time.monotonic() + LINGER_S
        self._unsent = unsent

    def done(self) -> None:
        pass

    def close(self) -> None:
        self._pool.give(self._buf)
        self._fd.close()
