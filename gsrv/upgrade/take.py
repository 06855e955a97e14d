"""`gsrv upgrade`, the new code's side: started by the previous code's exec with the state
record's fd in GSRV_UPGRADE_RECORD, it takes each fd by its role instead of making it anew
(listeners, the admin listener, the guardian's pipe, the spawner's socket, the sessions'
sockets and stderr pipes), adopts the spawner and its children, and runs the moved sessions.
The signals the previous code blocked before its exec are unblocked once this code's
handlers are in place (`unblock`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import gevent

from gsrv.errors import GsrvError
from gsrv.relay.relays import Closing
from gsrv.upgrade.leave import HELD_SIGNALS, RECORD_ENV
from gsrv.upgrade.moving import Unpacked, unpacked
from gsrv.upgrade.record import Record, read

if TYPE_CHECKING:
    from gsrv.logs import Log
    from gsrv.server import Server
    from gsrv.spawn.client import Spawner
    from gsrv.spawn.guardian import Guardian


def _end_lost(parts: Unpacked, kill_grace: float) -> None:
    parts.child.stop(kill_grace, lambda _after: None, signal_first=True)
    parts.relay.close_at_once(Closing("upgrade_failed", clean=False))
    parts.child.wait_reaped()


class Taken:
    """The record the previous code left, and the fds it names until each is taken."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self._fds = dict(record.fds)
        self.began = time.monotonic()

    @classmethod
    def from_environ(cls) -> Taken | None:
        """The record, if this process is an upgrade's new code (the variable is removed: it
        names an fd of this process only). Raises RecordError."""
        value = os.environ.pop(RECORD_ENV, None)
        if value is None:
            return None
        if not value.isdigit():
            raise GsrvError(f"{RECORD_ENV}={value!r} is not an fd number")
        fd = int(value)
        try:
            return cls(read(fd))
        finally:
            os.close(fd)

    def fd(self, role: str) -> int | None:
        """The fd of that role, now this code's (close-on-exec again); None: the record has none."""
        fd = self._fds.pop(role, None)
        if fd is not None:
            os.set_inheritable(fd, False)
        return fd

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
        """The moved sessions' parts, their fds taken (a session of a service this config does
        not have is among them: `run` ends it)."""
        moved = []
        for values in self.record.state.get("sessions", []):
            sid = str(values["sid"])
            fds = {role: fd for role in (f"session:{sid}:socket", f"session:{sid}:stderr")
                   if (fd := self.fd(role)) is not None}  # fmt: skip
            service = next((s for s in server.services if s.cfg.name == values["service"]), None)
            signal_in_exit = service.cfg.launch.signal_in_exit if service is not None else False
            moved.append(unpacked(values, fds, server.launcher, signal_in_exit))
        return moved

    def spawner(self, spawner: Spawner, moved: list[Unpacked]) -> None:
        fd, err = self.fd("spawner"), self.fd("spawner:stderr")
        state = self.state("spawner")
        if fd is None or err is None:
            raise GsrvError("the upgrade record names no spawner socket: its children could not be reaped")
        spawner.adopt(int(state["pid"]), fd, err, int(state["generation"]), [m.child.process for m in moved])

    def run(self, server: Server, moved: list[Unpacked], log: Log) -> int:
        """Each moved session adopted by its service and running; returns how many. One whose
        service this config lacks is ended (reason=upgrade_failed) through a service-less ladder."""
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
        return running

    def close_rest(self, log: Log) -> None:
        """Fds the record named that nothing took (a listener of a service this config removed)."""
        for role, fd in sorted(self._fds.items()):
            log.info("upgrade_fd_closed", role=role, why="this config has no use for it")
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def unblock(self) -> None:
        """The previous code blocked these before its exec: this code's handlers are in now."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)

    def served(self, log: Log, moved: int, running: int) -> dict[str, object]:
        """The one `event=upgrade` line; the result GET /upgrade shows."""
        upgrade = self.state("upgrade")
        exec_at = float(upgrade.get("exec_at", self.began))
        result: dict[str, object] = {
            "upgrade": upgrade.get("number"), "result": "ok", "from_version": upgrade.get("from_version"),
            "moved": running, "lost": moved - running, "ended": upgrade.get("ended", 0),
            "settled_ms": upgrade.get("settled_ms"), "exec_ms": round((time.monotonic() - exec_at) * 1000, 1),
        }  # fmt: skip
        log.info("upgrade", **result)
        return result
