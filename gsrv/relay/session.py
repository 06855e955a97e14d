"""One connection: its child, its relay, the facts its end rules decide on, the teardown.

Whatever happens inside a session (a bug included), one `finally` runs the relay's close,
the child's stop ladder and reap, and writes the session_end line: exactly one, after the reap.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gevent.event import Event

from gsrv.config.parse import ServerConfig, ServiceConfig
from gsrv.edge.arrival import Visit
from gsrv.edge.refusal import reset
from gsrv.errors import RESOURCE_ERRORS, SpawnError
from gsrv.logs import Log
from gsrv.relay.child import Child, Launcher
from gsrv.relay.choice import choose
from gsrv.relay.ending import EndRules, Facts, Verdict
from gsrv.relay.pump import Meter
from gsrv.relay.record import Recording
from gsrv.relay.relays import Closing, Relay
from gsrv.relay.stderr import StderrLog

if TYPE_CHECKING:
    from gsrv.relay.watchdog import Watchdog

WARN_EVERY_S = 60.0

_pipe_size_warned: dict[str, float] = {}  # service -> when its refused pipe_size was last logged


class Session:
    """Relay one client through one child; `run()` never raises.

    `relay` is chosen at start() from the service's relay key and the connection (TLS or
    not) unless one is given. `on_end` hears of the end after the log line (the metrics)."""

    def __init__(
        self,
        svc: ServiceConfig,
        server: ServerConfig,
        visit: Visit,
        log: Log,
        watchdog: Watchdog,
        launcher: Launcher,
        relay: Relay | None = None,
        on_end: Callable[[Session], None] | None = None,
    ) -> None:
        self.svc, self.server, self.sid, self.log = svc, server, visit.sid, log
        self.visit, self.sock = visit, visit.sock
        self.watchdog = watchdog
        self.launcher = launcher
        self._started_spawn = 0.0
        self.relay = relay
        self.on_end = on_end  # after the log line (the metrics)
        self.reason: str | None = None  # why it ended, once it has
        self._aborted: str | None = None  # the first abnormal end asked for
        self.child: Child | None = None
        self.spawn_seconds: float | None = None
        self.spawn_error: str | None = None
        self.stderr = StderrLog(self.stderr_line)  # the child's stderr as log lines (stderr = "log")
        self._wake = Event()
        self._started = visit.started  # a prelude's time counts: session_timeout runs from accept
        self.relaying = False  # between its start and its verdict: no teardown step has run (an upgrade may move it)
        self.end_fields: dict[str, object] = {}  # added to its line (an upgrade's end: upgrade=1)

    @property
    def duration(self) -> float:
        return time.monotonic() - self._started

    @property
    def greenlets(self) -> int:
        """How many greenlets work for it: the relay's directions and the stderr reader (the
        session's own is not counted)."""
        return (len(self.relay.tasks) if self.relay else 0) + len(self.stderr.greenlets)

    def meters(self) -> list[tuple[str, Meter]]:
        return self.relay.meters() if self.relay else []

    # -- what the relay, the watchdog and a drain tell it ---------------------------------

    def abort(self, reason: str) -> None:
        """End the session abnormally (the client sees a reset); the first reason wins."""
        if self._aborted is None:
            self._aborted = reason
            self._wake.set()

    @property
    def ending(self) -> bool:
        """An abnormal end was asked for (it may not have been obeyed yet)."""
        return self._aborted is not None

    def changed(self) -> None:
        self._wake.set()

    def bug(self, error: Exception) -> None:
        self.log.error("session_error", service=self.svc.name, session=self.sid,
                       error=f"{type(error).__name__}: {error}")  # fmt: skip
        self.abort("internal_error")

    def note(self, event: str, **fields: object) -> None:
        self.log.info(event, service=self.svc.name, session=self.sid, **fields)

    def peer_is_dead(self) -> bool:
        """The watchdog's check (the relay knows what it may read without stealing the child's errors)."""
        return self.relay.peer_is_dead() if self.relay is not None else False

    # -- start ----------------------------------------------------------------------------

    def start(self, prespawned: Child | None = None) -> int | None:
        """Ask the spawner for the child, without yielding (or take one started ahead:
        `prespawned`); None when the request went out, else the errno. Runs inside the accept
        loop: an errno in RESOURCE_ERRORS (fds, memory, a spawner that cannot take it now) keeps
        the client for the gate to try again; any other has ended the session (client reset,
        line written). `spawned()` waits for the answer."""
        self._started_spawn = time.perf_counter()
        try:
            svc = self.svc
            if self.relay is None:
                self.relay = choose(svc, self.visit, self.server.eof_grace, self._recording)
            if prespawned is not None:
                self.child = prespawned
                return None
            env = self.visit.env(svc)
            self.child = self.launcher.spawn(svc.launch, env, self.relay.stdio(svc.stderr))
        except (SpawnError, OSError) as e:
            return self._spawn_failed(e)
        return None

    def spawned(self) -> int | None:
        """Wait for the spawner's answer: None when the child runs, else as start() says."""
        assert self.child is not None
        try:
            self.child.started()
        except SpawnError as e:
            self.child = None
            return self._spawn_failed(e)
        svc = self.svc
        self.spawn_seconds = time.perf_counter() - self._started_spawn
        if svc.interact.peer_line == "proxy-v1":  # its stdin is an empty pipe: the line fits at once
            with contextlib.suppress(OSError):  # a child that closed its stdin (or ended) does not read it
                os.write(self.child.stdin, self.visit.peer_line())
        if self.child.placement_failed:
            self.log.error("cgroup_placement_failed", service=svc.name, session=self.sid,
                           error="; ".join(self.child.placement_failed),
                           next="the spawner may still be in this session's cgroups: restart gsrv")  # fmt: skip
        if self.child.pipe_size_error:
            self._pipe_size_refused(self.child.pipe_size_error)
        return None

    def _spawn_failed(self, e: SpawnError | OSError) -> int:
        if e.errno in RESOURCE_ERRORS:
            self.spawn_error = str(e)
            return e.errno
        self.fail("spawn_failed", str(e))
        return e.errno or 0

    def _pipe_size_refused(self, error: OSError) -> None:
        now = time.monotonic()
        if now - _pipe_size_warned.get(self.svc.name, -WARN_EVERY_S) >= WARN_EVERY_S:
            _pipe_size_warned[self.svc.name] = now
            hint = "the user's pipe budget is spent (fs.pipe-user-pages-soft)" if error.errno == errno.EPERM else ""
            self.log.warning(
                "pipe_size_refused", service=self.svc.name, session=self.sid, pipe_size=self.svc.pipe_size,
                error=error.strerror, hint=hint or None, using="the kernel's default",
            )  # fmt: skip

    def fail(self, reason: str, error: str | None = None) -> None:
        """End a session that never ran: reset the client, write its line."""
        self.reason = reason
        if self.relay is not None:
            self.relay.close_at_once(Closing(reason, clean=False))  # a reset (a WebSocket: its close frame first)
        else:
            reset(self.sock)
        self._log_end({"error": error or self.spawn_error})

    # -- run and end ----------------------------------------------------------------------

    def run(self) -> None:
        """Relay until the end rules give a verdict, then tear down and write the log line,
        from one finally, whatever happened before. Never raises."""
        verdict, extra = Verdict("internal_error", clean=False), dict[str, object]()
        try:
            verdict = self._relay()
        except Exception as e:  # a bug must end only this session, and say so
            extra = {"error": f"{type(e).__name__}: {e}"}
        finally:
            self.relaying = False
            self.reason = verdict.reason
            try:
                self._teardown(verdict.clean)
            except Exception as e:  # a bug in the teardown itself: still one line, saying so
                self.reason, extra = "internal_error", {"error": f"{type(e).__name__}: {e}"}
            finally:
                self._log_end(extra)

    def _relay(self) -> Verdict:
        assert self.child is not None and self.relay is not None
        child, relay, svc = self.child, self.relay, self.svc
        child.exited.rawlink(lambda _: self._wake.set())
        if child.stderr >= 0 and svc.stderr == "log":
            self.stderr.open(child.stderr, child.exited)
        relay.start(child, self)
        self.watchdog.add(self)
        self.relaying = True
        ws = svc.interact.websocket
        rules = EndRules(self._started, self.server.eof_grace, svc.idle_timeout, svc.session_timeout,
                         ws.reattach if ws else 0.0)  # fmt: skip
        while True:
            self._wake.clear()
            decision = rules.decide(self._facts(child, relay))
            if isinstance(decision, Verdict):
                return decision
            self._wake.wait(decision)

    def _facts(self, child: Child, relay: Relay) -> Facts:
        relay.sample(child)
        exited = child.exited.is_set()
        return Facts(
            now=time.monotonic(),
            aborted=self._aborted,
            input_done=relay.input_done,
            output_eof=relay.output_eof,
            exited=exited,
            hung_up=relay.hung_up,
            ended_well=self._signal(child) is None and (child.exit_code == 0 or self.svc.nonzero_exit == "close"),
            output_in_flight=exited and not relay.output_eof and relay.output_in_flight(child.stdout),
            last_activity=relay.last_activity(),
            detached_since=relay.detached_since,
        )

    def _teardown(self, clean: bool) -> None:
        """The relay's directions stop, the connection closes (FIN or reset), the child's
        group is stopped and reaped, in the relay's order. Every step runs even if one before
        it raised; the first error is raised after the last step. The stderr reader ends
        right after the ladder closed the child's pipes, before anything can yield (a freed
        fd number must not wake it)."""
        self.watchdog.discard(self)
        close = functools.partial(self._close, clean)
        order: list[Callable[[], None]]
        if self.relay is not None and self.relay.closes_after_stop:
            order = [self._stop_child, self.stderr.end, close]
        else:
            order = [close, self._stop_child, self.stderr.end]
        first: BaseException | None = None
        for step in (self.stderr.last, self._stop_relay, *order, self._reaped, self._closed_anyway, self.stderr.tail):
            try:
                step()
            except BaseException as e:  # kept, and raised once every step has run
                first = first or e
        if first is not None:
            raise first

    def _stop_relay(self) -> None:
        if self.relay is not None:
            self.relay.stop()  # a recording's queue is written after it, off the loop

    def _stop_child(self) -> None:
        child = self.child
        if child is None:
            return
        cut = self.relay is not None and self.relay.cut_input
        child.stop(self.server.kill_grace, self._escalated, signal_first=cut)

    def _reaped(self) -> None:
        """After the stderr reader's end: the wait for the reap yields, and the closed pipes'
        fd numbers may be a new connection's by then."""
        if self.child is not None:
            self.child.wait_reaped()

    @property
    def kept_alive(self) -> bool:
        """The connection stays open for its next request (HTTP keep-alive)."""
        return self.relay is not None and self.relay.kept_alive

    @property
    def http_status(self) -> int | None:
        return self.relay.http_status if self.relay is not None else None

    def _closed_anyway(self) -> None:
        if self.sock.fileno() >= 0 and not self.kept_alive:  # a close that raised must not leave the connection open
            reset(self.sock)

    def _close(self, clean: bool) -> None:
        if self.relay is not None:
            self.relay.close(self._closing(clean))
        else:
            reset(self.sock)

    def _signal(self, child: Child) -> str | None:
        """The signal that ended the child, unless it is gsrv's own hangup of its terminal (the
        end of input a raw terminal has: a session ended by it ended well)."""
        name = child.signal_name
        return None if name == "HUP" and self.relay is not None and self.relay.hung_up else name

    def _closing(self, clean: bool) -> Closing:
        """The verdict and the child's status, as the connection's close needs them."""
        child, reason = self.child, self.reason or "internal_error"
        if child is None:
            return Closing(reason, clean)
        signame = self._signal(child)
        bad = signame is not None or child.exit_code not in (0, None)
        return Closing(reason, clean, child.exit_code, signame, drop=bad and self.svc.nonzero_exit == "reset")

    def stderr_line(self, line: str) -> None:
        self.log.info("child_stderr", service=self.svc.name, session=self.sid, line=line)

    def _recording(self) -> Recording:
        """record = DIR: the session's bytes as an asciicast file (relay/record.py)."""
        interact = self.svc.interact
        assert interact.record is not None
        return Recording(interact.record, self.sid, interact.record_max, interact.record_input, self._record_cut)

    def _record_cut(self, why: str, error: str) -> None:
        self.log.warning("record_cut", service=self.svc.name, session=self.sid, why=why, error=error or None,
                         next="the session goes on, no longer recorded")  # fmt: skip

    def _escalated(self, after: float) -> None:
        assert self.child is not None
        self.log.warning(
            "kill_escalated", service=self.svc.name, session=self.sid, pid=self.child.pid,
            ignored="TERM", after_s=after, next="KILL",
        )  # fmt: skip

    def _log_end(self, extra: dict[str, object]) -> None:
        child, relay = self.child, self.relay
        signame = child.signal_name if child is not None else None
        self.log.info(
            "session_end",
            service=self.svc.name,
            session=self.sid,
            **self.visit.log_fields(),
            **(relay.log_fields() if relay else {"bytes_in": 0, "bytes_out": 0}),
            duration_ms=round(self.duration * 1000, 1),
            relay=relay.name if relay else None,
            cgroup=child.process.cgroup or None if child else None,
            **(child.usage.log_fields() if child and child.usage else {}),
            **(child.rusage_fields if child else {}),
            exit=child.exit_code if child else None,
            signal=signame,
            stderr_dropped=self.stderr.dropped or None,
            reason=self.reason,
            **self.end_fields,
            **extra,
        )
        if self.on_end is not None:
            self.on_end(self)
        if not self.kept_alive:
            self.visit.arrival.ended()
