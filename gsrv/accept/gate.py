"""Admission for one listener: max_sessions, max_pending, pauses (draining, memory pressure,
resources).

The only caller of start_accepting/stop_accepting, gevent's own paths back to them included:
admit() never raises and accept errors pause accepting instead of arming gevent's retry timer.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import gevent
from gevent.server import StreamServer

from gsrv.errors import RESOURCE_ERRORS
from gsrv.logs import Log

RETRY_S = 1.0
SPAWNS_IN_FLIGHT = 8  # sessions whose command was asked for and not yet started: then accept waits
ENDED = -1  # Handler.spawned: the session ended without a command
RETRY_MAX_S = 30.0
BURST_QUIET_S = 2.0  # a shortage burst ends after this long without one: one line each way per burst


@dataclass
class Burst:
    """Shortages of fds or memory close together: logged as one pause and one resume."""

    started: float
    last: float  # the latest shortage
    pauses: int = 0


C = TypeVar("C")  # a connection accepted, not yet a session
S = TypeVar("S")  # a running session


@dataclass(frozen=True)
class _Finished(Generic[C]):
    """A prelude that ran to its end: the connection ready for a slot, or None."""

    ready: C | None


class Handler(Protocol[C, S]):
    """What a gate asks of its service, in a connection's order (trio's serve_listeners takes
    one handler the same way)."""

    @property
    def has_prelude(self) -> bool:
        """Whether connections run `prelude` (a PROXY header, a TLS handshake) before a slot."""

    def arrive(self, sock: Any, address: Any) -> C | None:
        """At accept, without yielding: the connection, or None when a rule refused it."""

    def prelude(self, conn: C) -> C | None:
        """In its own greenlet, no slot held: the connection with what its prelude found (what
        start() takes), or None when the connection is not this gate's any more (refused, or
        handed to a running session)."""

    def start(self, conn: C) -> S | int | None:
        """Ask for its command without yielding: the session; an errno when fds or memory ran
        out (the connection is kept, to try again); None when it ended the connection."""

    def spawned(self, session: S) -> int | None:
        """Wait until its command started: None when it runs; an errno as start() gives; ENDED
        when the session ended (its command could not start)."""

    def run(self, session: S) -> None:
        """The session until its child is reaped; its slot frees when this returns."""

    def drop(self, conn: C, reason: str, error: str | None = None) -> None:
        """End a connection that never became a session (a drain, a prelude that raised)."""


def may_accept(
    active: int, limit: int, paused: set[str] | frozenset[str], pending: int = 0, max_pending: int = 1
) -> bool:
    """The gate's decision, as a pure function: pending counts the connections still in their
    PROXY header or TLS handshake, and those done but waiting for a session slot."""
    return not paused and active < limit and pending < max_pending


class Listener(StreamServer):  # type: ignore[misc]
    """A StreamServer whose accept loop answers to a Gate."""

    def __init__(self, sock: Any, gate: Gate[Any, Any]) -> None:
        super().__init__(sock, gate.admit)  # gevent requires a handle; do_handle below is what runs
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
        """In the accept loop itself: gevent's own would spawn a greenlet per connection and
        close the socket when the handle returns (the gate starts the sessions it admits)."""
        self.gate.admit(sock, address)


class Gate(Generic[C, S]):
    """Counts sessions and opens or closes its listener's accept loop.

    Each session's command is asked for inside the accept loop and started by the spawner
    while accept goes on (at most SPAWNS_IN_FLIGHT at once). A spawn that runs out of fds
    or memory (EMFILE and the like), whether gsrv or the spawner finds it, stops accepting;
    that client and those accepted meanwhile are held (parked) and the others wait in the
    backlog; when a session ends, or on a backed-off timer, a parked one is tried again, and
    once its command runs the others follow. Nobody is refused for want of fds.

    With a prelude (a PROXY header to read, a TLS handshake), a connection first runs it
    in its own greenlet without a max_sessions slot, counted as pending (at most
    max_pending, then accept waits); done, it queues for a slot like a parked one.
    """

    def __init__(self, name: str, max_sessions: int, log: Log, handler: Handler[C, S]) -> None:
        self.name = name
        self.max_sessions = max_sessions
        self.max_pending = 1
        self.handler = handler
        self.pending = 0  # in their prelude
        self.ready: deque[C] = deque()  # prelude done, waiting for a slot
        self.knocking: deque[C] = deque()  # kept-alive connections whose next request came, waiting for room
        self._preludes: set[gevent.Greenlet] = set()
        self.closed = False
        self.log = log
        self.active = 0
        self.paused: set[str] = set()
        self.listener: Listener | None = None
        self.short = False  # out of fds or memory
        self._parked: deque[C] = deque()  # accepted clients whose command could not start yet
        self.spawning = 0  # commands asked for, not started yet
        self._retry: gevent.Greenlet | None = None
        self._burst: Burst | None = None  # while fds or memory keep running out

    def attach(self, listener: Listener) -> None:
        self.listener = listener

    @property
    def waiting(self) -> int:
        """Connections without a slot: in their prelude, or done and queued for one."""
        return self.pending + len(self.ready)

    def full(self) -> bool:
        if self.short or self.spawning >= SPAWNS_IN_FLIGHT:
            return True
        return not may_accept(self.active, self.max_sessions, self.paused, self.waiting, self.max_pending)

    def set_limits(self, max_sessions: int, max_pending: int) -> None:
        self.max_sessions, self.max_pending = max_sessions, max_pending
        self._start_ready()
        self.update()

    def pause(self, reason: str) -> None:
        self.paused.add(reason)
        self.update()

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)
        self.update()

    def update(self) -> None:
        self._let_in()
        listener = self.listener
        if listener is None or listener.closed or not listener.started:
            return
        if self.full():
            listener.stop_accepting()
        else:
            listener.start_accepting()

    def admit(self, sock: Any, address: Any) -> None:
        """Start one session's command now (or its prelude), then relay in its own greenlet.
        Never raises: an exception here would make gevent re-arm accept behind the gate's back."""
        try:
            conn = self.handler.arrive(sock, address)
        except Exception as e:
            self.log.error("session_refused", service=self.name, error=f"{type(e).__name__}: {e}")
            sock.close()
            return
        if conn is None:  # a rule refused it
            return
        if not self.handler.has_prelude:
            self._start(conn)
            return
        self._prelude(conn)
        self.update()

    def knock(self, conn: C) -> None:
        """A kept-alive connection's next request began: it runs its prelude (the head) once
        the gate would accept a new connection (kept-alive ones first), so a service that is
        full or paused reads none of it meanwhile."""
        if self.closed:
            self.handler.drop(conn, "shutdown")
            return
        self.knocking.append(conn)
        self.update()

    def _let_in(self) -> None:
        while self.knocking and not self.closed and not self.short and self.spawning < SPAWNS_IN_FLIGHT and may_accept(
                self.active, self.max_sessions, self.paused, self.waiting, self.max_pending):  # fmt: skip
            self._prelude(self.knocking.popleft())

    def _prelude(self, conn: C) -> None:
        self.pending += 1
        greenlet = gevent.spawn(self._run_prelude, conn)
        greenlet.link(lambda done: self._prelude_done(conn, done))  # also when killed before it ran
        self._preludes.add(greenlet)

    def _run_prelude(self, conn: C) -> _Finished[C]:
        return _Finished(self.handler.prelude(conn))

    def _prelude_done(self, conn: C, greenlet: gevent.Greenlet) -> None:
        """A connection back from its prelude queues for a slot; None: not this gate's any more.
        A prelude killed before it ran (a drain) or that raised (a bug): the connection ends here."""
        self.pending -= 1
        self._preludes.discard(greenlet)
        outcome = greenlet.value
        if isinstance(outcome, _Finished) and outcome.ready is not None:
            if self.closed:
                self.handler.drop(outcome.ready, "shutdown")
            else:
                self.ready.append(outcome.ready)
                self._start_ready()
        elif not isinstance(outcome, _Finished):
            error = None if greenlet.exception is None else f"{type(greenlet.exception).__name__}: {greenlet.exception}"
            self.handler.drop(conn, "shutdown" if self.closed else "internal_error", error)
        self.update()

    def _start_ready(self) -> None:
        while self.ready and self.active < self.max_sessions and not self.short:
            self._start(self.ready.popleft())

    def _start(self, conn: C) -> None:
        try:
            started = self.handler.start(conn)
        except Exception as e:
            self.handler.drop(conn, "spawn_failed", f"{type(e).__name__}: {e}")
            return
        if started is None:
            return
        if isinstance(started, int):  # out of fds or memory
            self._park(conn, started)
            return
        self.active += 1
        self.spawning += 1
        gevent.spawn(self._run, conn, started)
        self.update()

    def _park(self, conn: C, error: int) -> None:
        if self.closed:  # a spawn in flight when the drain began: no retry now
            self.handler.drop(conn, "shutdown")
            return
        self._parked.append(conn)
        self._resources_short(error)

    def _run(self, conn: C, session: S) -> None:
        parked = False
        try:
            try:
                outcome = self.handler.spawned(session)
            finally:
                self.spawning -= 1
            if outcome is None:
                self._resources_back()
                self.update()  # a spawn no longer in flight may reopen accept
                self.handler.run(session)
            elif outcome != ENDED:  # out of fds or memory: kept, and tried again later
                parked = True
                self._park(conn, outcome)
        finally:
            self.active -= 1
            if not parked:
                self._try_again()  # a session ended: its fds are free again
            self._start_ready()
            self.update()

    def _resources_back(self) -> None:
        """A command started: if fds or memory had run short, the parked clients go first."""
        if self.short:
            self.short = False  # accept_resumed is logged when the whole burst is over
            while (self._parked and not self.short and not self.closed and self.active < self.max_sessions
                   and self.spawning < SPAWNS_IN_FLIGHT):  # fmt: skip
                self._start(self._parked.popleft())

    def _try_again(self) -> None:
        if self.closed:
            return
        if self.short and self._parked:
            self._start(self._parked.popleft())
        elif self.short:
            self.short = False  # accept() itself failed: let it try

    def close(self, reason: str) -> None:
        """Take no more connections, and end those not started yet: parked, in their prelude,
        queued for a slot (a drain, a service a reload removed)."""
        self.closed = True
        while self._parked:
            self.handler.drop(self._parked.popleft(), reason)
        while self.ready:
            self.handler.drop(self.ready.popleft(), reason)
        while self.knocking:
            self.handler.drop(self.knocking.popleft(), reason)
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
