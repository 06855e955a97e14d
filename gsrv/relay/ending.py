"""How a session ends, as data: the facts a session gathered in, the verdict (reason, FIN or
reset) or how long to wait before asking again. Pure: tested without sockets or children.

Every row of DESIGN.md's end table is a branch of `EndRules.decide`, and nothing else
decides a session's end.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from gsrv.relay.pump import End

VALID_SIGNALS = frozenset(signal.valid_signals())
POLL_S = 0.1  # while a child that exited may still have output in flight: look again this often

# A relay direction that stopped abnormally, and the reason its session ends with (a reset).
FAILURES: dict[tuple[str, End], str] = {
    ("in", End.SOURCE_ERROR): "client_reset",  # reading the client failed: a reset, or it vanished
    ("out", End.SINK_CLOSED): "client_reset",  # writing to the client failed
    ("out", End.SOURCE_ERROR): "child_exit",  # reading the child's output failed
}


@dataclass(frozen=True)
class Facts:
    """What a session knows at one moment; `aborted` is the first abnormal end asked for (a
    relay failure, the watchdog, a drain, a bug), the others are what the relay and child saw."""

    now: float
    aborted: str | None = None
    input_done: bool = False  # the client's EOF reached the child's stdin
    output_eof: bool = False  # the child's stdout reached EOF
    exited: bool = False  # the child was reaped
    hung_up: bool = False  # the client's input ended on a raw-mode terminal and gsrv hung it up
    ended_well: bool = False  # exit 0 (or any exit, with nonzero_exit = "close"), not a signal
    output_in_flight: bool = False  # output bytes held by the relay or queued in the stdout pipe
    last_activity: float = 0.0  # the latest byte either way (discarded input included)
    detached_since: float | None = None  # reattach: the client's connection dropped then, none since


@dataclass(frozen=True)
class Verdict:
    reason: str
    clean: bool  # FIN after all output (and a lingering close); False: a reset


class EndRules:
    """One session's end rules and the two moments they remember: when its output ended, and
    since when nothing has flowed after its child exited."""

    __slots__ = ("started", "eof_grace", "idle_timeout", "session_timeout", "reattach", "output_ended_at",
                 "quiet_since")  # fmt: skip

    def __init__(self, started: float, eof_grace: float, idle_timeout: float, session_timeout: float,
                 reattach: float = 0.0) -> None:  # fmt: skip
        self.started, self.eof_grace = started, eof_grace
        self.idle_timeout, self.session_timeout, self.reattach = idle_timeout, session_timeout, reattach
        self.output_ended_at: float | None = None
        self.quiet_since: float | None = None

    def decide(self, f: Facts) -> Verdict | float | None:
        """The verdict, or the seconds to wait before deciding again (None: until a fact changes)."""
        if f.aborted:
            return Verdict(f.aborted, clean=False)
        finished = "hangup" if f.hung_up else "eof" if f.input_done else "child_exit"
        waits: list[float] = []
        if f.output_eof:
            if self.output_ended_at is None:
                self.output_ended_at = f.now
            if f.exited:
                return Verdict(finished, f.ended_well)
            waited = f.now - self.output_ended_at
            if waited >= self.eof_grace:  # stdout closed, the child runs on: it cannot be known to be done
                return Verdict(finished, clean=False)
            waits.append(self.eof_grace - waited)
        elif f.exited:
            # A grandchild may hold stdout open: the grace counts only while nothing flows.
            if f.output_in_flight:
                self.quiet_since = None
            else:
                if self.quiet_since is None:
                    self.quiet_since = f.now
                if f.now - self.quiet_since >= self.eof_grace:
                    return Verdict("child_exit", f.ended_well)
            waits.append(POLL_S)
        if self.idle_timeout:
            idle_until = f.last_activity + self.idle_timeout
            if f.now >= idle_until:
                return Verdict("idle_timeout", clean=False)
            waits.append(idle_until - f.now)
        if f.detached_since is not None:
            ends_at = f.detached_since + self.reattach
            if f.now >= ends_at:
                return Verdict("reattach_expired", clean=False)
            waits.append(ends_at - f.now)
        if self.session_timeout:
            ends_at = self.started + self.session_timeout
            if f.now >= ends_at:
                return Verdict("session_timeout", clean=False)
            waits.append(ends_at - f.now)
        return min(waits) if waits else None


def ending_of(status: int, signal_in_exit: bool) -> tuple[int | None, int | None, str | None]:
    """A wait() status word as (exit code, signal number, the signal's name without SIG: TERM,
    KILL; RTMIN+3 or 42 for a real-time one); with `signal_in_exit` (bwrap's), an exit 128+N for
    a signal N this host has is that signal."""
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if not (signal_in_exit and code - 128 in VALID_SIGNALS):
            return code, None, None
        number = code - 128
    elif os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
    else:
        return None, None, None
    try:
        return None, number, signal.Signals(number).name.removeprefix("SIG")
    except ValueError:  # the real-time signals between RTMIN and RTMAX have no member
        return None, number, str(number)
