"""The server's state, in one place:
STARTING -> SERVING <-> PAUSED -> [ANNOUNCING ->] DRAINING -> STOPPED.

PAUSED is the memory guard holding accept on every listener. ANNOUNCING (drain_announce) is a
stop announced to load balancers: readiness fails while the listeners still accept. Every change goes through one
checked transition (supervisor's _assertInState) that logs `event=state`; what monitoring
reads (readiness, accept paused, drain time) is derived from it, not kept beside it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from gevent.event import Event

from gsrv.errors import GsrvError
from gsrv.logs import Log


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    PAUSED = "paused"  # the memory guard holds accept on every listener
    ANNOUNCING = "announcing"  # stopping: /readyz fails, listeners still accept (the guard may hold them)
    DRAINING = "draining"
    STOPPED = "stopped"


NEXT = {
    State.STARTING: {State.SERVING, State.PAUSED},
    State.SERVING: {State.PAUSED, State.ANNOUNCING, State.DRAINING},
    State.PAUSED: {State.SERVING, State.ANNOUNCING, State.DRAINING},
    State.ANNOUNCING: {State.DRAINING},
    State.DRAINING: {State.STOPPED},
    State.STOPPED: set(),
}


class BadTransition(GsrvError):
    """A change of state the lifecycle does not have: a bug in gsrv, never a user's error."""


class Lifecycle:
    """The state, the memory pressure it was last told of, when the drain began."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.state = State.STARTING
        self.memory_pressure = False  # the guard's last word, also while starting or draining
        self.drain_started: float | None = None
        self.stopped = Event()
        self.observers: list[Callable[[State], None]] = []  # told each new state (systemd's notify)

    def _to(self, state: State) -> None:
        if state not in NEXT[self.state]:
            raise BadTransition(f"the server cannot go from {self.state.value} to {state.value}")
        self.state = state
        self.log.info("state", state=state.value)
        for observer in self.observers:
            observer(state)
        if state is State.STOPPED:
            self.stopped.set()

    def serve(self) -> None:
        """Listening: serving, or paused if the guard found pressure before the first accept."""
        self._to(State.PAUSED if self.memory_pressure else State.SERVING)

    def pressure(self, on: bool) -> None:
        """The guard's pause (on) or relief; a pressure seen while starting, announcing or
        draining is kept."""
        self.memory_pressure = on
        if on and self.state is State.SERVING:
            self._to(State.PAUSED)
        elif not on and self.state is State.PAUSED:
            self._to(State.SERVING)

    def announce(self) -> bool:
        """Announce the stop; False if a stop has begun already (or the server is not serving)."""
        if self.state not in (State.SERVING, State.PAUSED):
            return False
        self._to(State.ANNOUNCING)
        return True

    def drain(self) -> bool:
        """Begin the drain, announced or not; False if it has begun already (or the server is
        not serving)."""
        if self.state not in (State.SERVING, State.PAUSED, State.ANNOUNCING):
            return False
        self.drain_started = time.monotonic()
        self._to(State.DRAINING)
        return True

    def stop(self) -> None:
        """The drain is over; a second call (a forced stop racing the drain) does nothing."""
        if self.state is not State.STOPPED:
            self._to(State.STOPPED)

    @property
    def closing(self) -> bool:
        """The drain has begun (or is over): no listener opens any more."""
        return self.state in (State.DRAINING, State.STOPPED)

    @property
    def accept_paused(self) -> bool:
        return self.memory_pressure or self.drain_started is not None

    def drain_seconds(self) -> float:
        return time.monotonic() - self.drain_started if self.drain_started is not None else 0.0

    def not_ready(self) -> str | None:
        """Why a load balancer should not send new clients here now; None when it may."""
        if self.state in (State.ANNOUNCING, State.DRAINING, State.STOPPED):
            return "draining"
        if self.memory_pressure:
            return "accept paused by the memory guard"
        return None
