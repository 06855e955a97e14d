"""A connection's bytes as the HTTP front and the relays above it see them: plain or
decrypted (edge/tls.py's TlsStream), sent whole under a lock; and the refusal of a request
gsrv answered itself.
"""

from __future__ import annotations

import time
from typing import Protocol

from gevent.lock import Semaphore
from gevent.socket import socket

from gsrv.errors import GsrvError


class Stream(Protocol):
    """The bytes of a connection, plain or decrypted (edge/tls.py's TlsStream)."""

    closed: bool  # it sends no more (TLS: our close_notify went out)
    torn: bool  # a send stopped inside its bytes (a direction killed mid-write): no frame can follow

    def recv(self, size: int) -> bytes: ...
    def send(self, data: bytes | bytearray | memoryview) -> float: ...
    def close_notify(self) -> None: ...


class Refused(GsrvError):
    """gsrv answered a request itself (a refusal, the console page): `reason` for the log."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason


class PlainStream:
    """A plain connection as a Stream; whole writes under a lock, since both directions of a
    WebSocket session send frames on it (TlsStream does the same for records)."""

    def __init__(self, sock: socket) -> None:
        self.sock = sock
        self._sending = Semaphore()
        self.closed = False
        self.torn = False  # a send stopped inside its bytes: the peer holds part of a frame

    def recv(self, size: int) -> bytes:
        return bytes(self.sock.recv(size))

    def send(self, data: bytes | bytearray | memoryview) -> float:
        started = time.monotonic()
        with self._sending:
            try:
                self.sock.sendall(data)
            except BaseException:  # an error, a timeout, a kill: part of it may be out; for good
                self.torn = True
                raise
        return time.monotonic() - started

    def close_notify(self) -> None:
        """Nothing to say below the WebSocket close frame on a plain connection: it sends no more."""
        self.closed = True
