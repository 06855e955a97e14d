"""Shortages of fds or memory at accept, close together, logged as one burst: one
`accept_paused reason=resources` line when the first comes, one `accept_resumed` once accept
has run BURST_QUIET_S without another (pauses come and go as sessions end and free fds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent

from gsrv.logs import Log

RETRY_S = 1.0
RETRY_MAX_S = 30.0
BURST_QUIET_S = 2.0  # a shortage burst ends after this long without one: one line each way per burst


@dataclass
class Burst:
    """Shortages of fds or memory close together: logged as one pause and one resume."""

    started: float
    last: float  # the latest shortage
    pauses: int = 0


class Shortages:
    """One gate's shortage bursts; `short()` and `closed()` are the gate's state."""

    def __init__(self, service: str, log: Log, short: Callable[[], bool], closed: Callable[[], bool]) -> None:
        self.service, self.log, self.short, self.closed = service, log, short, closed
        self.burst: Burst | None = None  # while fds or memory keep running out

    def happened(self, error: int) -> None:
        """A shortage now (before the gate marks itself short): the burst's first is logged."""
        now = time.monotonic()
        if self.burst is None:
            self.burst = Burst(now, now)
            self.log.warning(
                "accept_paused", service=self.service, reason="resources", error=os.strerror(error),
                next=f"try again when a session ends, or after {RETRY_S:g}s doubling to {RETRY_MAX_S:g}s",
            )  # fmt: skip
            gevent.spawn(self._burst_end)
        if not self.short():
            self.burst.pauses += 1
        self.burst.last = now

    def _burst_end(self) -> None:
        """Log accept_resumed once accept has run BURST_QUIET_S without a shortage."""
        burst = self.burst
        assert burst is not None
        while True:
            quiet_for = time.monotonic() - burst.last
            if self.closed() or (not self.short() and quiet_for >= BURST_QUIET_S):
                break
            gevent.sleep(max(BURST_QUIET_S - quiet_for, 0.25))
        self.burst = None
        self.log.info("accept_resumed", service=self.service, reason="resources", pauses=burst.pauses,
                      burst_s=round(burst.last - burst.started, 1))  # fmt: skip
