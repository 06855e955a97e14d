"""`gsrv upgrade`, the new code's side: started by the previous code's exec with the state
record's fd in GSRV_UPGRADE_RECORD, it takes each fd by its role instead of making it anew
(listeners, the admin listener, the guardian's pipe, the spawner's socket, the sessions'
sockets and stderr pipes), adopts the spawner and its children, and runs the moved sessions.
The signals the previous code blocked before its exec are unblocked once this code's
handlers are in place (`unblock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import gevent

from gsrv.edge.keepalive import close as close_between
from gsrv.errors import GsrvError
from gsrv.logs import Log
from gsrv.relay.relays import Closing
from gsrv.service import ADMIN_DRAIN, ADMIN_PAUSE
from gsrv.upgrade.leave import FAILED_ENV, HELD_SIGNALS, PREVIOUS_ENV, RECORD_ENV
from gsrv.upgrade.moving import Unpacked, idle_unpacked, unpacked
from gsrv.upgrade.record import Record, read

LOG_FLUSH_S = 1.0

if TYPE_CHECKING:
    from gsrv.server import Server
    from gsrv.spawn.client import Spawner
    from gsrv.spawn.guardian import Guardian


def _end_lost(parts: Unpacked, kill_grace: float) -> None:
    parts.child.stop(kill_grace, lambda _after: None, signal_first=True)
    parts.relay.close_at_once(Closing("upgrade_failed", clean=False))
    parts.child.wait_reaped()


def fall_back(record_fd: int, why: str, previous: str | None, record: Record | None) -> None:
    """Exec the previous code (`previous`: its executable and argv as JSON) with the same record,
    every fd it names inheritable again, the signals still blocked; returns only if there is
    none to exec or the exec failed."""
    if previous is None:
        return
    try:
        executable, *argv = json.loads(previous)
        for fd in [record_fd, *(record.fds.values() if record is not None else ())]:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, True)
        os.execve(executable, argv, {**os.environ, RECORD_ENV: str(record_fd), FAILED_ENV: why[:2000]})
    except (OSError, ValueError, TypeError):
        return


class Taken:
    """The record the previous code left, and the fds it names until each is taken."""

    def __init__(self, record: Record, fd: int) -> None:
        self.record, self.record_fd = record, fd  # the fd stays open until the takeover is done (a fallback's)
        self._fds = dict(record.fds)
        self.began = time.monotonic()
        self.done = False  # every part taken and serving: from here on a failure is this code's own
        self.failed = os.environ.pop(FAILED_ENV, None)  # this is a fallback: why the newer code failed
        self.previous = os.environ.pop(PREVIOUS_ENV, None)  # what to fall back to, if this takeover fails

    @classmethod
    def from_environ(cls) -> Taken | None:
        """The record, if this process is an upgrade's new code (the variable is removed: it
        names an fd of this process only). Raises RecordError (a fallback, if any, was tried)."""
        value = os.environ.pop(RECORD_ENV, None)
        if value is None:
            return None
        if not value.isdigit():
            raise GsrvError(f"{RECORD_ENV}={value!r} is not an fd number")
        fd = int(value)
        try:
            return cls(read(fd), fd)
        except GsrvError as e:  # no config read yet: a plain log line on fd 2
            why, previous = f"the upgrade record: {e}", os.environ.pop(PREVIOUS_ENV, None)
            log = Log(2)
            log.error("upgrade_takeover_failed", why=why, next="the previous code" if previous else "exit")
            log.flush(LOG_FLUSH_S)
            fall_back(fd, why, previous, None)
            raise

    def fd(self, role: str) -> int | None:
        """The fd of that role, now this code's (close-on-exec again); None: the record has none."""
        fd = self._fds.pop(role, None)
        if fd is not None:
            os.set_inheritable(fd, False)
        return fd

    def listener(self, role: str, address: str) -> int | None:
        """A listener's fd, if the config still names the address it listens on (a moved address
        is bound anew, as a reload binds it; the old socket is closed with the rest)."""
        if self.state("listens").get(role) != address:
            return None
        return self.fd(role)

    def state(self, part: str) -> dict[str, Any]:
        found = self.record.state.get(part)
        return found if isinstance(found, dict) else {}

    def guardian(self, guardian: Guardian) -> None:
        fd, err = self.fd("guardian"), self.fd("guardian:stderr")
        state = self.state("guardian")
        if fd is None or err is None:
            raise GsrvError("the upgrade record names no guardian pipe: its sessions would be left unguarded")
        guardian.adopt(int(state["pid"]), fd, err, str(state.get("pending", "")))

    def sessions(self, server: Server) -> list[Unpacked]:
        """The moved sessions' parts, their fds taken (one of a service this config does not
        have is among them: `run` ends it)."""
        moved = []
        for values in self.record.state.get("sessions", []):
            sid = str(values["sid"])
            roles = (f"session:{sid}:{name}" for name in ("socket", "stdin", "stdout", "stderr", "pty"))
            fds = {role: fd for role in roles if (fd := self.fd(role)) is not None}
            service = next((s for s in server.services if s.cfg.name == values["service"]), None)
            eof_grace = server.config.server.eof_grace
            moved.append(unpacked(values, fds, server.launcher, service.cfg if service else None, eof_grace))
        return moved

    def spawner(self, spawner: Spawner, moved: list[Unpacked]) -> None:
        fd, err = self.fd("spawner"), self.fd("spawner:stderr")
        state = self.state("spawner")
        if fd is None or err is None:
            raise GsrvError("the upgrade record names no spawner socket: its children could not be reaped")
        spawner.adopt(int(state["pid"]), fd, err, int(state["generation"]), [m.child.process for m in moved])

    def run(self, server: Server, moved: list[Unpacked], log: Log) -> int:
        """Each moved session adopted by its service and running; returns how many. One whose
        service this config lacks (the check refuses such a config; a race can still make one)
        gets `upgrade_session_lost` and its child's stop ladder, its connection reset."""
        running = 0
        for parts in moved:
            service = next((s for s in server.services if s.cfg.name == parts.service), None)
            if service is None:
                log.error("upgrade_session_lost", session=parts.visit.sid, service=parts.service,
                          why="the new config has no such service", next="its child is stopped")  # fmt: skip
                gevent.spawn(_end_lost, parts, server.config.server.kill_grace)
                continue
            service.adopt(parts.visit, parts.relay, parts.child, parts.spawn_seconds)
            running += 1
        for values in self.record.state.get("idle", []):
            fd = self.fd(f"idle:{values['sid']}:socket")
            name, visit, left = idle_unpacked(values, {f"idle:{values['sid']}:socket": fd} if fd is not None else {})
            service = next((s for s in server.services if s.cfg.name == name), None)
            if service is None or service.cfg.interact.http is None:
                gevent.spawn(close_between, visit)  # its service is gone, or no longer HTTP: a FIN, as a drain's
                continue
            service.adopt_idle(visit, left)
        return running

    def operator(self, server: Server) -> None:
        """The operator's pauses and drains go on (a drain's drain_timeout counts from now)."""
        for name, reasons in self.state("operator").items():
            for action, reason in (("pause", ADMIN_PAUSE), ("drain", ADMIN_DRAIN)):
                if reason in reasons:
                    server.act(str(name), action, {"by": "upgrade"})

    def close_rest(self, log: Log) -> None:
        """Fds the record named that nothing took (a listener of a service this config removed)."""
        for role, fd in sorted(self._fds.items()):
            log.info("upgrade_fd_closed", role=role, why="this config has no use for it")
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def unblock(self) -> None:
        """The previous code blocked these before its exec: this code's handlers are in now, and
        the takeover is done (the record's fd goes)."""
        self.done = True
        os.close(self.record_fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)

    def failed_now(self, why: str, log: Log) -> None:
        """The takeover failed before it was done: the previous code, if the upgrade named another
        (`--exec`) and it is still there, takes over again from the same record (this execs);
        otherwise every session of the record is logged as ended (reason=upgrade_failed), and
        gsrv's exit lets the guardian end them."""
        log.error("upgrade_takeover_failed", why=why, next="the previous code" if self.previous else "exit")
        log.flush(LOG_FLUSH_S)
        fall_back(self.record_fd, why, self.previous, self.record)
        for values in self.record.state.get("sessions", []):
            log.error("session_end", service=values.get("service"), session=values.get("sid"),
                      relay=values.get("relay"), reason="upgrade_failed", error=why)  # fmt: skip
        log.flush(LOG_FLUSH_S)

    def served(self, log: Log, moved: int, running: int) -> dict[str, object]:
        """The one `event=upgrade` line; the result GET /upgrade shows (a fallback's: failed, why)."""
        upgrade = self.state("upgrade")
        exec_at = float(upgrade.get("exec_at", self.began))
        result: dict[str, object] = {
            "upgrade": upgrade.get("number"), "result": "ok" if self.failed is None else "failed",
            "why": None if self.failed is None else f"{self.failed} (the previous code took over again)",
            "from_version": upgrade.get("from_version"),
            "moved": running, "lost": moved - running, "ended": upgrade.get("ended", 0),
            "settled_ms": upgrade.get("settled_ms"), "exec_ms": round((time.monotonic() - exec_at) * 1000, 1),
            "largest_pause_ms": 0.0,
        }  # fmt: skip
        pumped = any(values.get("pumped") is not None for values in self.record.state.get("sessions", []))
        result["largest_pause_ms"] = result["exec_ms"] if pumped else 0.0  # a socket handoff's bytes never stop
        (log.info if self.failed is None else log.error)("upgrade", **result)
        return result
