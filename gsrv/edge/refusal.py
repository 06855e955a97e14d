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

from gsrv.edge.arrival import Visit
from gsrv.logs import Log

DRAIN_READS = 4  # reads of what the client already sent, never waiting: close() over unread input is a reset


class Refusals:
    """One service's refusals; `counted(visit, reason)` runs after each line (the metrics)."""

    def __init__(self, service: str, log: Log, counted: Callable[[Visit, str], None] | None = None) -> None:
        self.service, self.log, self.counted = service, log, counted

    def refuse(self, visit: Visit, reason: str, banner: bytes = b"", error: str | None = None,
               answered: bool = False) -> None:  # fmt: skip
        """A rule said no: the banner if any, a FIN, then close (after a banner, or an answer
        already sent, such as an HTTP status, what the client sent is read first)."""
        sock = visit.sock
        if banner:
            with contextlib.suppress(OSError):
                os.write(sock.fileno(), banner)  # a fresh socket's buffer takes a short banner at once
        fin_and_drain(sock, bool(banner) or answered)  # input already here would make close() lose the banner
        self._ended(visit, reason, error)

    def quiet(self, visit: Visit) -> None:
        """A kept-alive connection its client closed between requests: no request, no line."""
        visit.sock.close()
        visit.arrival.ended()

    def drop(self, visit: Visit, reason: str, error: str | None = None) -> None:
        """A connection that cannot go on (a drain, a failed start, a bug): a reset."""
        reset(visit.sock)
        self._ended(visit, reason, error or visit.arrival.spawn_error)

    def _ended(self, visit: Visit, reason: str, error: str | None) -> None:
        self.log.info(
            "session_end", service=self.service, session=visit.sid, **visit.log_fields(), bytes_in=0,
            bytes_out=0, duration_ms=round(visit.age() * 1000, 1), reason=reason,
            error=error,
        )  # fmt: skip
        if self.counted is not None:
            self.counted(visit, reason)
        visit.arrival.ended()


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
