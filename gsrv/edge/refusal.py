"""The end of a connection that never got a child: a rule refused it (the door), its spawn was
put off and a drain came first, or its prelude failed. The one writer of those session_end
lines, with the same fields as a session's (bytes 0, no exit), and of their counting hook.
"""

from __future__ import annotations

import contextlib
import os
import socket as stdsocket
import struct
from collections.abc import Callable

from gsrv.edge.arrival import Arrival
from gsrv.logs import Log

DRAIN_READS = 4  # reads of what the client already sent, never waiting: close() over unread input is a reset


class Refusals:
    """One service's refusals; `counted(arrival, reason)` runs after each line (the metrics)."""

    def __init__(self, service: str, log: Log, counted: Callable[[Arrival, str], None] | None = None) -> None:
        self.service, self.log, self.counted = service, log, counted

    def refuse(self, arrival: Arrival, reason: str, banner: bytes = b"", error: str | None = None,
               answered: bool = False) -> None:  # fmt: skip
        """A rule said no: the banner if any, a FIN, then close (after a banner, or an answer
        already sent, such as an HTTP status, what the client sent is read first)."""
        sock = arrival.sock
        if banner:
            with contextlib.suppress(OSError):
                os.write(sock.fileno(), banner)  # a fresh socket's buffer takes a short banner at once
        fin_and_drain(sock, bool(banner) or answered)  # input already here would make close() lose the banner
        self._ended(arrival, reason, error)

    def quiet(self, arrival: Arrival) -> None:
        """A kept-alive connection its client closed between requests: no request, no line."""
        arrival.sock.close()
        arrival.ended()

    def drop(self, arrival: Arrival, reason: str, error: str | None = None) -> None:
        """A connection that cannot go on (a drain, a failed start, a bug): a reset."""
        reset(arrival.sock)
        self._ended(arrival, reason, error or arrival.spawn_error)

    def _ended(self, arrival: Arrival, reason: str, error: str | None) -> None:
        self.log.info(
            "session_end", service=self.service, session=arrival.sid, **arrival.log_fields(), bytes_in=0,
            bytes_out=0, duration_ms=round(arrival.age() * 1000, 1), reason=reason,
            error=error,
        )  # fmt: skip
        if self.counted is not None:
            self.counted(arrival, reason)
        arrival.ended()


def fin_and_drain(sock: stdsocket.socket, read_first: bool = True) -> None:
    """A FIN, then (read_first) what the client already sent read, at most DRAIN_READS reads
    that never wait (after something went out: input left unread would make close() a reset
    that may lose it), then close. For a connection gsrv answered itself, without a child."""
    fd = sock.fileno()
    with contextlib.suppress(OSError):  # BlockingIOError included: nothing more to read
        sock.shutdown(stdsocket.SHUT_WR)
        if read_first:
            for _ in range(DRAIN_READS):
                if not os.read(fd, 65536):
                    break
    sock.close()


def reset(sock: stdsocket.socket) -> None:
    """Close with an RST: the client must not take a truncated reply for a complete one."""
    with contextlib.suppress(OSError):
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
