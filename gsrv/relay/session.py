"""One connection: its child, the pumps both ways, half-close, timeouts, the reason it ended.

The only writer of the session_end log line; exactly one per session, after the reap.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket as stdsocket
import struct
import termios
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event
from gevent.socket import socket, wait_read

from gsrv.config.parse import ServerConfig, ServiceConfig
from gsrv.edge.arrival import Arrival
from gsrv.errors import RESOURCE_ERRORS, SpawnError
from gsrv.logs import Log
from gsrv.relay import pump
from gsrv.relay.child import Child
from gsrv.relay.stderr import StderrLines

if TYPE_CHECKING:
    from gsrv.relay.watchdog import Watchdog

LINGER_S = 2.0  # how long a closing session waits for the client's EOF once the reply is acked
GRACE_POLL_S = 0.1
TCP_CLOSE = 7
WARN_EVERY_S = 60.0
STDERR_READ = 65536

_pipe_size_warned: dict[str, float] = {}  # service -> when its refused pipe_size was last logged


def _reset(sock: socket) -> None:
    """Close with an RST: the client must not take a truncated reply for a complete one."""
    with contextlib.suppress(OSError):
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _unsent(sock: socket) -> int:
    """Bytes in the socket's send queue the client has not acknowledged yet."""
    return pump.queued(sock.fileno(), termios.TIOCOUTQ)


class Session:
    """Relay one client through one child; `run()` never raises."""

    def __init__(
        self,
        svc: ServiceConfig,
        server: ServerConfig,
        arrival: Arrival,
        sid: str,
        log: Log,
        watchdog: Watchdog,
    ) -> None:
        self.svc, self.server, self.sid, self.log = svc, server, sid, log
        self.arrival, self.sock, self.tcp = arrival, arrival.sock, arrival.tcp
        self.watchdog = watchdog
        self.inbound, self.outbound, self.discarded = pump.Meter(), pump.Meter(), pump.Meter()
        self.input_done = False  # the client's EOF reached the child's stdin
        self.client_eof = False
        self.stdout_eof = False
        self.abort_reason: str | None = None
        self.child: Child | None = None
        self.spawn_seconds: float | None = None
        self.greenlets: list[gevent.Greenlet] = []
        self.spawn_error: str | None = None
        self.stderr = StderrLines()
        self.relay: str | None = None  # "splice" or "copy", chosen at start(): TLS needs the bytes in userland
        self._at_end: list[Callable[[], None]] = []
        self._wake = Event()
        self._started = time.monotonic()

    @property
    def duration(self) -> float:
        return time.monotonic() - self._started

    def meters(self) -> list[tuple[str, pump.Meter]]:
        return [("in", self.inbound), ("out", self.outbound)]

    def abort(self, reason: str) -> None:
        """End the session abnormally (the client sees a reset); the first reason wins."""
        if self.abort_reason is None:
            self.abort_reason = reason
            self._wake.set()

    def peer_is_dead(self) -> bool:
        """The watchdog's check: the kernel closed the connection (RST) but no pump noticed."""
        try:
            state = self.sock.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_INFO, 8)[0] if self.tcp else 0
            error = self.sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ERROR)
        except OSError:
            return True
        return bool(state == TCP_CLOSE or error != 0)

    def start(self) -> int | None:
        """Spawn the child, without yielding; None when it runs, else the errno.

        Runs inside the accept loop, so the gate knows before the next accept() whether
        fds or memory ran out. On such an error (RESOURCE_ERRORS) the client is kept for
        the gate to try again; on any other the session has ended: client reset, line written.
        """
        try:
            started = time.perf_counter()
            svc = self.svc
            splice = svc.relay != "copy" and pump.HAS_SPLICE and self.arrival.tls is None
            self.relay = "splice" if splice else "copy"
            env = self.arrival.env(svc, self.sid)
            self.child = Child.spawn(svc.command, env, svc.cwd, svc.stderr, svc.pipe_size, svc.executable or None,
                                     svc.policy.launcher, svc.policy.umask)  # fmt: skip
            self.spawn_seconds = time.perf_counter() - started
            if self.child.pipe_size_error:
                self._pipe_size_refused(self.child.pipe_size_error)
        except (SpawnError, OSError) as e:
            if e.errno in RESOURCE_ERRORS:
                self.spawn_error = str(e)
                return e.errno
            self.fail("spawn_failed", str(e))
            return e.errno or 0
        return None

    def _pipe_size_refused(self, error: OSError) -> None:
        now = time.monotonic()
        if now - _pipe_size_warned.get(self.svc.name, -WARN_EVERY_S) >= WARN_EVERY_S:
            _pipe_size_warned[self.svc.name] = now
            hint = "the user's pipe budget is spent (fs.pipe-user-pages-soft)" if error.errno == errno.EPERM else ""
            self.log.warning(
                "pipe_size_refused", service=self.svc.name, session=self.sid, pipe_size=self.svc.pipe_size,
                error=error.strerror, hint=hint or None, using="the kernel's default",
            )  # fmt: skip

    def at_end(self, hook: Callable[[], None]) -> None:
        """Call hook once the session has ended (after its log line), however it ends."""
        self._at_end.append(hook)

    def refuse(self, reason: str, banner: bytes = b"", error: str | None = None) -> None:
        """End a connection a rule refused before it got a child: the banner, then close."""
        self.abort_reason = reason
        fd = self.sock.fileno()
        with contextlib.suppress(OSError):  # BlockingIOError included: nothing more to read
            if banner:
                os.write(fd, banner)  # a fresh socket's buffer takes a short banner at once
            self.sock.shutdown(stdsocket.SHUT_WR)
            if banner:  # input already here would turn close() into a reset that may lose the banner
                for _ in range(4):
                    if not os.read(fd, 65536):
                        break
        self.sock.close()
        self._log_end({"error": error})

    def fail(self, reason: str, error: str | None = None) -> None:
        """End a session that never ran: reset the client, write its line."""
        self.abort_reason = reason
        _reset(self.sock)
        self._log_end({"error": error or self.spawn_error})

    def run(self) -> None:
        """Relay until the session ends, tear down, write the log line. Never raises."""
        fields: dict[str, object] = {}
        try:
            self._relay()
        except Exception as e:  # a bug must end only this session, and say so
            self.abort_reason = "internal_error"
            fields = {"error": f"{type(e).__name__}: {e}"}
            _reset(self.sock)
        self._log_end(fields)

    def _relay(self) -> None:
        assert self.child is not None
        child = self.child
        child.exited.rawlink(lambda _: self._wake.set())
        greenlets = self.greenlets = [gevent.spawn(self._guarded, self._up), gevent.spawn(self._guarded, self._down)]
        if child.stderr >= 0:
            greenlets.append(gevent.spawn(self._guarded, self._err))
        self.watchdog.add(self)
        try:
            reason, graceful = self._wait_for_end()
            self.abort_reason = reason
            if child.exited.is_set() and child.stderr >= 0:
                greenlets[-1].join(timeout=GRACE_POLL_S)  # let the last stderr lines in
            gevent.killall(greenlets)
            if graceful:
                self._close_gracefully()
            else:
                _reset(self.sock)
            child.stop(self.server.kill_grace, self._escalated)
        finally:
            self.watchdog.discard(self)
            gevent.killall(greenlets)
            child.close_pipes()
        for line in self.stderr.finish(time.monotonic()):
            self._stderr_line(line)

    # -- the pumps -----------------------------------------------------------------------

    def _guarded(self, work: Callable[[], None]) -> None:
        """A bug in a pump ends its own session with a reset and a log line, never hangs it."""
        try:
            work()
        except Exception as e:
            self.log.error("session_error", service=self.svc.name, session=self.sid, error=f"{type(e).__name__}: {e}")
            self.abort("internal_error")

    def _up(self) -> None:
        assert self.child is not None
        sock, stdin = self.sock.fileno(), self.child.stdin
        if self.arrival.tls is not None:
            end = pump.pump_in(self.arrival.tls, stdin, self.svc.chunk_size, self.inbound)
        elif self.relay == "splice":
            end = pump.splice(sock, stdin, self.inbound, source_is_socket=True)
        else:
            end = pump.copy(sock, stdin, self.svc.chunk_size, self.inbound, sink_is_pipe=True)
        if end is pump.End.SOURCE_EOF:
            self.child.close_stdin()
            self.input_done = self.client_eof = True
        elif end is pump.End.SINK_CLOSED:
            # The child stopped reading; what the client still sends has nowhere to go.
            self.child.close_stdin()
            end = pump.discard(self.sock.fileno(), self.svc.chunk_size, self.discarded)
            self.client_eof = end is pump.End.SOURCE_EOF
        if end is pump.End.SOURCE_ERROR:
            self.abort("client_reset")
        self._wake.set()

    def _down(self) -> None:
        assert self.child is not None
        stdout, sock = self.child.stdout, self.sock.fileno()
        if self.arrival.tls is not None:
            end = pump.pump_out(stdout, self.arrival.tls, self.svc.chunk_size, self.outbound)
        elif self.relay == "splice":
            end = pump.splice(stdout, sock, self.outbound, source_is_socket=False)
        else:
            end = pump.copy(stdout, sock, self.svc.chunk_size, self.outbound)
        if end is pump.End.SINK_CLOSED:
            self.abort("client_reset")
        elif end is pump.End.SOURCE_ERROR:
            self.abort("child_exit")
        else:
            self.stdout_eof = True
        self._wake.set()

    def _err(self) -> None:
        assert self.child is not None
        pipe = pump.Fd(self.child.stderr, pump.READ)
        try:
            while data := pipe.read(STDERR_READ):
                for line in self.stderr.feed(data, time.monotonic()):
                    self._stderr_line(line)
                gevent.sleep(self.stderr.pause())  # yields; over the line budget, waits for it
        except OSError:
            pass
        finally:
            pipe.close()

    def _stderr_line(self, line: str) -> None:
        self.log.info("child_stderr", service=self.svc.name, session=self.sid, line=line)

    # -- deciding the end ----------------------------------------------------------------

    def _wait_for_end(self) -> tuple[str, bool]:
        """Wait until the session must end; returns (reason, whether the client gets a FIN)."""
        assert self.child is not None
        child, svc, grace = self.child, self.svc, self.server.eof_grace
        eof_at: float | None = None
        quiet_since: float | None = None
        while True:
            self._wake.clear()
            now = time.monotonic()
            waits = []
            if self.abort_reason:
                return self.abort_reason, False
            if self.stdout_eof:
                eof_at = eof_at or now
                if child.exited.is_set():
                    return ("eof" if self.input_done else "child_exit"), self._ended_well()
                if now - eof_at >= grace:  # stdout closed, but the child runs on
                    return ("eof" if self.input_done else "child_exit"), False
                waits.append(eof_at + grace - now)
            elif child.exited.is_set():
                # A grandchild may hold stdout open; count the grace only while nothing flows.
                if self.outbound.holding or pump.queued(child.stdout, termios.FIONREAD):
                    quiet_since = None
                else:
                    quiet_since = quiet_since or now
                    if now - quiet_since >= grace:
                        return "child_exit", self._ended_well()
                waits.append(GRACE_POLL_S)
            if svc.idle_timeout:
                idle_until = max(self.inbound.last, self.outbound.last, self.discarded.last) + svc.idle_timeout
                if now >= idle_until:
                    return "idle_timeout", False
                waits.append(idle_until - now)
            if svc.session_timeout:
                if now - self._started >= svc.session_timeout:
                    return "session_timeout", False
                waits.append(self._started + svc.session_timeout - now)
            self._wake.wait(min(waits) if waits else None)

    def _ended_well(self) -> bool:
        assert self.child is not None
        if self.child.killed_by is not None:
            return False
        return self.child.exit_code == 0 or self.svc.nonzero_exit == "close"

    def _close_gracefully(self) -> None:
        """FIN after all output; then drain the client's input so close() sends no RST.

        Input left unread at close() makes the kernel reset the connection and discard
        reply bytes still queued for the client. Drain until the client's EOF, or until
        LINGER_S after the client last acknowledged reply bytes.
        """
        sock = self.sock
        if self.arrival.tls is not None:
            self.arrival.tls.close_notify()
        try:
            sock.shutdown(stdsocket.SHUT_WR)
        except OSError:
            sock.close()
            return
        deadline = time.monotonic() + LINGER_S
        unsent = _unsent(sock)
        while not self.client_eof:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                wait_read(sock.fileno(), timeout=min(left, GRACE_POLL_S))
                data = sock.recv(65536)
            except TimeoutError:
                data = b"."
            except OSError:
                break
            if not data:
                break
            now_unsent = _unsent(sock)
            if now_unsent < unsent:
                deadline = time.monotonic() + LINGER_S
            unsent = now_unsent
        sock.close()

    def _escalated(self, after: float) -> None:
        assert self.child is not None
        self.log.warning(
            "kill_escalated", service=self.svc.name, session=self.sid, pid=self.child.pid,
            ignored="TERM", after_s=after, next="KILL",
        )  # fmt: skip

    def _log_end(self, extra: dict[str, object]) -> None:
        child = self.child
        signame = None
        if child is not None and child.killed_by is not None:
            signame = signal.Signals(child.killed_by).name.removeprefix("SIG")
        self.log.info(
            "session_end",
            service=self.svc.name,
            session=self.sid,
            **self.arrival.log_fields(),
            bytes_in=self.inbound.total,
            bytes_out=self.outbound.total,
            discarded=self.discarded.total or None,
            duration_ms=round(self.duration * 1000, 1),
            relay=self.relay,
            exit=child.exit_code if child else None,
            signal=signame,
            stderr_dropped=self.stderr.dropped or None,
            reason=self.abort_reason,
            **extra,
        )
        for hook in self._at_end:
            hook()
