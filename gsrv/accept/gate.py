"""Admission for one listener: max_sessions, max_pending, pauses (draining, memory pressure,
resources).

The only caller of start_accepting/stop_accepting, gevent's own paths back to them included:
admit() never raises and accept errors pause accepting instead of arming gevent's retry timer.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import gevent
from gevent.server import StreamServer

from gsrv.errors import RESOURCE_ERRORS
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


class Startable(Protocol):
    def start(self) -> int | None: ...
    def fail(self, reason: str, error: str | None = None) -> None: ...


S = TypeVar("S", bound=Startable)


def may_accept(
    active: int, limit: int, paused: set[str] | frozenset[str], pending: int = 0, max_pending: int = 1
) -> bool:
    """The gate's decision, as a pure function: pending counts the connections still in their
    PROXY header or TLS handshake, and those done but waiting for a session slot."""
    return not paused and active < limit and pending < max_pending


class Listener(StreamServer):  # type: ignore[misc]
    """A StreamServer whose accept loop answers to a Gate."""

    def __init__(self, sock: Any, gate: Gate[Any]) -> None:
        super().__init__(sock, gate.admit)  # do_handle below calls the gate directly
        self.gate = gate
        self.full = gate.full  # gevent consults this before each accept()

    def start_accepting(self) -> None:
        """gevent calls this itself too (start(), its retry timer): the gate has the last word."""
        if not self.gate.full():
            super().start_accepting()

    def do_read(self) -> Any:
        try:
            return super().do_read()
        except OSError as e:
            self.gate.accept_failed(e)
            return None

    def do_handle(self, sock: Any, address: Any) -> None:
        self.gate.admit(sock, address)


class Gate(Generic[S]):
    """Counts sessions and opens or closes its listener's accept loop.

    Each session's command is started inside the accept loop, so a spawn that runs out
    of fds or memory (EMFILE and the like) stops accepting before the next accept().
    That client is held (parked) and the others wait in the backlog; when a session
    ends, or on a backed-off timer, the parked one is tried again, and once its command
    runs the others follow. Nobody is refused for want of fds.

    With a prelude (a PROXY header to read, a TLS handshake), a connection first runs it
    in its own greenlet without a max_sessions slot, counted as pending (at most
    max_pending, then accept waits); done, it queues for a slot like a parked one.
    """

    def __init__(
        self,
        name: str,
        max_sessions: int,
        log: Log,
        open_session: Callable[[Any, Any], S | None],
        run_session: Callable[[S], None],
    ) -> None:
        self.name = name
        self.max_sessions = max_sessions
        self.max_pending = 1
        self.prelude: Callable[[S], bool] | None = None  # None: sessions start at accept
        self.pending = 0  # in their prelude
        self.ready: deque[S] = deque()  # prelude done, waiting for a slot
        self._preludes: set[gevent.Greenlet] = set()
        self.closed = False
        self.log = log
        self.open_session = open_session
        self.run_session = run_session
        self.active = 0
        self.paused: set[str] = set()
        self.listener: Listener | None = None
        self.short = False  # out of fds or memory
        self._parked: S | None = None  # the accepted client whose command could not start yet
        self._retry: gevent.Greenlet | None = None
        self._burst: Burst | None = None  # while fds or memory keep running out

    def attach(self, listener: Listener) -> None:
        self.listener = listener

    def full(self) -> bool:
        waiting = self.pending + len(self.ready)
        return self.short or not may_accept(self.active, self.max_sessions, self.paused, waiting, self.max_pending)

    def set_limits(self, max_sessions: int, max_pending: int, prelude: Callable[[S], bool] | None) -> None:
        self.max_sessions, self.max_pending, self.prelude = max_sessions, max_pending, prelude
        self._start_ready()
        self.update()

    def pause(self, reason: str) -> None:
        self.paused.add(reason)
        self.update()

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)
        self.update()

    def update(self) -> None:
        listener = self.listener
        if listener is None or listener.closed or not listener.started:
            return
        if self.full():
            listener.stop_accepting()
        else:
            listener.start_accepting()

    def admit(self, sock: Any, address: Any) -> None:
        """Start one session's command now, then relay in its own greenlet. Never raises:
        an exception here would make gevent re-arm accept behind the gate's back."""
        try:
            session = self.open_session(sock, address)
        except Exception as e:
            self.log.error("session_refused", service=self.name, error=f"{type(e).__name__}: {e}")
            sock.close()
            return
        if session is None:  # a rule refused it
            return
        if self.prelude is None:
            self._start(session)
            return
        self.pending += 1
        greenlet = gevent.spawn(self.prelude, session)
        greenlet.link(lambda done: self._prelude_done(session, done))  # also when killed before it ran
        self._preludes.add(greenlet)
        self.update()

    def _prelude_done(self, session: S, greenlet: gevent.Greenlet) -> None:
        """True: queue for a slot. False: the prelude ended the session itself. Anything
        else: it was killed before it ran (a drain), or raised (a bug): end it here."""
        self.pending -= 1
        self._preludes.discard(greenlet)
        if greenlet.value is True and not self.closed:
            self.ready.append(session)
            self._start_ready()
        elif greenlet.value is not False:
            error = None if greenlet.exception is None else f"{type(greenlet.exception).__name__}: {greenlet.exception}"
            session.fail("shutdown" if self.closed else "internal_error", error)
        self.update()

    def _start_ready(self) -> None:
        while self.ready and self.active < self.max_sessions and not self.short:
            self._start(self.ready.popleft())

    def _start(self, session: S) -> None:
        try:
            error = session.start()
        except Exception as e:
            session.fail("spawn_failed", f"{type(e).__name__}: {e}")
            return
        if error in RESOURCE_ERRORS:
            self._parked = session
            self._resources_short(error)
            return
        if error is not None:
            return
        if self.short:
            self.short = False  # accept_resumed is logged when the whole burst is over
        self.active += 1
        gevent.spawn(self._run, session)
        self.update()

    def _run(self, session: S) -> None:
        try:
            self.run_session(session)
        finally:
            self.active -= 1
            self._try_again()  # a session ended: its fds are free again
            self._start_ready()
            self.update()

    def _try_again(self) -> None:
        if self.short and self._parked is not None:
            session, self._parked = self._parked, None
            self._start(session)
        elif self.short:
            self.short = False  # accept() itself failed: let it try

    def drop_parked(self, reason: str) -> None:
        """End the sessions not started yet: parked, in their prelude, queued (draining)."""
        self.closed = True
        if self._parked is not None:
            session, self._parked = self._parked, None
            session.fail(reason)
        while self.ready:
            self.ready.popleft().fail(reason)
        gevent.killall(list(self._preludes), block=False)  # each ends its own (reason shutdown)

    def accept_failed(self, error: OSError) -> None:
        if error.errno in RESOURCE_ERRORS:
            self._resources_short(error.errno)
        else:
            self.log.debug("accept_error", service=self.name, error=str(error))

    def _resources_short(self, error: int) -> None:
        """Pause accept; log it once per burst (pauses come and go as sessions end and free fds)."""
        now = time.monotonic()
        if self._burst is None:
            self._burst = Burst(now, now)
            self.log.warning(
                "accept_paused", service=self.name, reason="resources", error=os.strerror(error),
                next=f"try again when a session ends, or after {RETRY_S:g}s doubling to {RETRY_MAX_S:g}s",
            )  # fmt: skip
            gevent.spawn(self._burst_end)
        if not self.short:
            self._burst.pauses += 1
        self._burst.last = now
        self.short = True
        if self._retry is None or self._retry.dead:
            self._retry = gevent.spawn(self._retry_loop)
        self.update()

    def _burst_end(self) -> None:
        """Log accept_resumed once accept has run BURST_QUIET_S without a shortage."""
        burst = self._burst
        assert burst is not None
        while True:
            quiet_for = time.monotonic() - burst.last
            if self.closed or (not self.short and quiet_for >= BURST_QUIET_S):
                break
            gevent.sleep(max(BURST_QUIET_S - quiet_for, 0.25))
        self._burst = None
        self.log.info("accept_resumed", service=self.name, reason="resources", pauses=burst.pauses,
                      burst_s=round(burst.last - burst.started, 1))  # fmt: skip

    def _retry_loop(self) -> None:
        """For fds held elsewhere: try again after RETRY_S, then twice as long, up to RETRY_MAX_S."""
        delay = RETRY_S
        while self.short:
            gevent.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            self._try_again()
            self._start_ready()
            self.update()
