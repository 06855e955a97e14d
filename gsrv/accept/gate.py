"""Admission for one listener: max_sessions, max_pending, pauses (draining, memory pressure,
resources), and with queue_timeout the clients held for a slot and their busy answer.

The only caller of start_accepting/stop_accepting, gevent's own paths back to them included:
admit() never raises and accept errors pause accepting instead of arming gevent's retry timer.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic

import gevent

from gsrv.accept.handler import ENDED, C, Handler, S
from gsrv.accept.held import Held
from gsrv.accept.shortage import RETRY_MAX_S, RETRY_S, Shortages
from gsrv.errors import RESOURCE_ERRORS
from gsrv.logs import Log
from gsrv.workers import WORKERS, Task

if TYPE_CHECKING:
    from gsrv.accept.listeners import Listener

SPAWNS_IN_FLIGHT = 8  # sessions whose command was asked for and not yet started: then accept waits


@dataclass(frozen=True)
class _Finished(Generic[C]):
    """A prelude that ran to its end: the connection ready for a slot, or None."""

    ready: C | None


def may_accept(
    active: int, limit: int, paused: set[str] | frozenset[str], pending: int = 0, max_pending: int = 1,
    held: int = 0, queue_max: int = 0,
) -> bool:  # fmt: skip
    """The gate's decision, as a pure function: pending counts the connections still in their
    PROXY header or TLS handshake, and those done but waiting for a session slot. With a queue
    (queue_max > 0: queue_timeout is set) a full service still accepts, up to queue_max held
    for a slot beside max_pending in their prelude; `paused` then holds only the pauses that
    keep clients in the backlog (those that answer busy at once are not in it)."""
    if queue_max:
        return not paused and pending < max_pending and held < queue_max
    return not paused and active < limit and pending + held < max_pending


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
        self.ready: Held[C] = Held()  # prelude done, waiting for a slot
        self.knocking: deque[C] = deque()  # kept-alive connections whose next request came, waiting for room
        self.queue_timeout = 0.0  # 0: no queue (the backlog holds clients, unanswered)
        self.queue_max = 0
        self.answering: frozenset[str] = frozenset()  # the pauses whose held clients get the busy answer at once
        self.answering_new: frozenset[str] = frozenset()  # ... during which new clients are accepted to get it
        self._expiry: gevent.Greenlet | None = None  # the busy answer for the first held client, when due
        self._preludes: set[Task] = set()
        self.closed = False
        self.settling = False  # an upgrade ends what is not started yet, without closing the gate
        self.log = log
        self.active = 0
        self.paused: set[str] = set()
        self.listener: Listener | None = None
        self.short = False  # out of fds or memory
        self._parked: deque[C] = deque()  # accepted clients whose command could not start yet
        self.spawning = 0  # commands asked for, not started yet
        self._retry: gevent.Greenlet | None = None
        self.shortages = Shortages(name, log, lambda: self.short, lambda: self.closed)

    def attach(self, listener: Listener) -> None:
        self.listener = listener

    @property
    def waiting(self) -> int:
        """Connections without a slot: in their prelude, or done and queued for one."""
        return self.pending + len(self.ready)

    def full(self) -> bool:
        return self.short or self.settling or self.spawning >= SPAWNS_IN_FLIGHT or not self._room()

    def _room(self) -> bool:
        """may_accept with the gate's counts: room for one more connection (a new one, or a
        kept-alive one's next request)."""
        if self.queue_timeout:
            return may_accept(self.active, self.max_sessions, self.paused - self.answering_new, self.pending,
                              self.max_pending, len(self.ready), self.queue_max)  # fmt: skip
        return may_accept(self.active, self.max_sessions, self.paused, self.pending, self.max_pending, len(self.ready))

    def set_queue(self, timeout: float, most: int, answering: frozenset[str], answering_new: frozenset[str]) -> None:
        """queue_timeout (0: off), queue_max, the pauses that answer those held at once, and
        those of them during which new clients are accepted to be answered too (the others
        leave new clients in the backlog); a pause that answers gives it to those held now."""
        self.queue_timeout, self.queue_max = timeout, most if timeout else 0
        self.answering = answering if timeout else frozenset()
        self.answering_new = answering_new & self.answering
        if self._expiry is not None:  # armed for the old timeout (or none now)
            self._expiry.kill(block=False)
            self._expiry = None
        if self.paused & self.answering:
            self._answer(self.ready.take_all())
        self._start_ready()
        self._arm()
        self.update()

    def set_limits(self, max_sessions: int, max_pending: int) -> None:
        self.max_sessions, self.max_pending = max_sessions, max_pending
        self._start_ready()
        self.update()

    def pause(self, reason: str) -> None:
        self.paused.add(reason)
        if reason in self.answering:  # those held get the busy answer now, not after their time
            self._answer(self.ready.take_all())
        self.update()

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)
        self._start_ready()
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
        now = time.monotonic()
        if not self.handler.has_prelude:
            if self.queue_timeout and (len(self.ready) or self.paused or self.active >= self.max_sessions):
                self._hold(conn, now)  # no slot now: held, with its deadline
                self.update()
            else:
                self._start(conn)
            return
        self._prelude(conn, now)
        self.update()

    def knock(self, conn: C) -> None:
        """A kept-alive connection's next request began: it runs its prelude (the head) once
        the gate would accept a new connection (kept-alive ones first), so a service that is
        full or paused reads none of it meanwhile (its queue_timeout counts from then)."""
        if self.closed:
            self.handler.drop(conn, "shutdown")
            return
        self.knocking.append(conn)
        self.update()

    def _let_in(self) -> None:
        """Kept-alive connections whose next request came, into their prelude (the head) when
        a new connection would be let in; with a queue they are then held in order like new
        ones, their queue_timeout counted from then."""
        while self.knocking and not self.closed and not self.full():
            self._prelude(self.knocking.popleft(), time.monotonic())

    def _prelude(self, conn: C, since: float) -> None:
        self.pending += 1
        task = WORKERS.start(self._run_prelude, conn, then=lambda done: self._prelude_done(conn, since, done))
        self._preludes.add(task)  # (its `then` runs however it ends: killed before it ran too)

    def _run_prelude(self, conn: C) -> _Finished[C]:
        return _Finished(self.handler.prelude(conn))

    def _prelude_done(self, conn: C, since: float, task: Task) -> None:
        """A connection back from its prelude queues for a slot; None: not this gate's any more.
        A prelude killed before it ran (a drain) or that raised (a bug): the connection ends here."""
        self.pending -= 1
        self._preludes.discard(task)
        outcome = task.value
        if isinstance(outcome, _Finished) and outcome.ready is not None:
            if self.closed:
                self.handler.drop(outcome.ready, "shutdown")
            else:
                self._hold(outcome.ready, since)
        elif not isinstance(outcome, _Finished):
            error = None if task.exception is None else f"{type(task.exception).__name__}: {task.exception}"
            self.handler.drop(conn, "shutdown" if self.closed else "internal_error", error)
        self.update()

    def _start_ready(self) -> None:
        """The oldest held get the free slots; none while paused (an operator's drain must not
        start what it waits to end)."""
        while len(self.ready) and self.active < self.max_sessions and not self.short and not self.paused:
            self._start(self.ready.popleft())

    def _hold(self, conn: C, since: float) -> None:
        """A connection ready for a slot (accepted at `since`): started if one is free, else
        held; with a queue, one still without a slot past its time, or at a pause that answers,
        gets the busy answer at once."""
        if self.queue_timeout and self.paused & self.answering:
            self._answer([conn])
            return
        self.ready.append(conn, since)
        self._start_ready()
        if self.queue_timeout:
            self._answer(self.ready.expired(time.monotonic(), self.queue_timeout))
            self._arm()

    def _arm(self) -> None:
        """The busy answer's timer, for the first held client's deadline."""
        if not self.queue_timeout or (self._expiry is not None and not self._expiry.dead):
            return
        due = self.ready.next_deadline(self.queue_timeout)
        if due is not None:
            self._expiry = gevent.spawn_later(max(0.0, due - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        if not self.queue_timeout:
            return
        self._answer(self.ready.expired(time.monotonic(), self.queue_timeout))
        self._arm()
        self.update()

    def _answer(self, conns: list[C]) -> None:
        for conn in conns:
            gevent.spawn(self.handler.busy, conn)  # each in its own greenlet: a TLS send may wait

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
        WORKERS.start(self._run, conn, started)
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
            self._ended(parked)

    def _ended(self, parked: bool = False) -> None:
        """A session's run returned (or its connection was parked): its slot frees."""
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
        for conn in self.ready.take_all():
            self.handler.drop(conn, reason)
        if self._expiry is not None:
            self._expiry.kill(block=False)
        while self.knocking:
            self.handler.drop(self.knocking.popleft(), reason)
        for task in list(self._preludes):
            task.kill(block=False)  # each ends its own (reason shutdown)

    def settle(self, on: bool = True) -> None:
        """An upgrade: accept waits (the backlog holds new clients) and kept-alive connections
        whose next request came stay knocking, unread (they move); a prelude under way runs on,
        and its session starts. Those parked end (reason shutdown), and those held for a slot
        get the busy answer (without a queue: shutdown). The gate stays open: an upgrade that
        fails before its exec serves on (`settle(False)`)."""
        self.settling = on
        if on:
            while self._parked:
                self.handler.drop(self._parked.popleft(), "shutdown")
            if self.queue_timeout:
                self._answer(self.ready.take_all())
            for conn in self.ready.take_all():
                self.handler.drop(conn, "shutdown")
        self.update()

    @property
    def settled(self) -> bool:
        """Nothing between accept and a running session (an upgrade waits for it)."""
        return not (self.pending or self.spawning or len(self.ready) or self._parked)

    def adopt(self, session: S) -> None:
        """A session an upgrade's previous code ran, its child long started: its slot, and its
        run in a worker (the slot frees when it returns, as any session's)."""
        self.active += 1
        WORKERS.start(self._run_adopted, session)

    def _run_adopted(self, session: S) -> None:
        try:
            self.handler.run(session)
        finally:
            self._ended()

    def accept_failed(self, error: OSError) -> None:
        if error.errno in RESOURCE_ERRORS:
            self._resources_short(error.errno)
        else:
            self.log.debug("accept_error", service=self.name, error=str(error))

    def _resources_short(self, error: int) -> None:
        """Pause accept (a burst's first shortage is logged), and try again later."""
        self.shortages.happened(error)
        self.short = True
        if self._retry is None or self._retry.dead:
            self._retry = gevent.spawn(self._retry_loop)
        self.update()

    def _retry_loop(self) -> None:
        """For fds held elsewhere: try again after RETRY_S, then twice as long, up to RETRY_MAX_S."""
        delay = RETRY_S
        while self.short:
            gevent.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            self._try_again()
            self._start_ready()
            self.update()
