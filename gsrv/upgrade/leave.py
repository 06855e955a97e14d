"""`gsrv upgrade`, the running code's side: asked for (POST /upgrade, SIGUSR2), it runs the new
code's check through the spawner, settles what cannot move, writes the state record and
re-execs itself in place (the same PID) with the fds that move made inheritable on purpose.

The order, each step a point an upgrade can still turn back from until the exec:
1. refused while another runs, or while gsrv announces, drains or stops;
2. the check: the new code, as its own process started by the spawner (gsrv never forks),
   reads a record of the state now on its stdin and answers `upgrade_check ok` (exit 0) or why
   not; anything else refuses the upgrade, and gsrv serves on;
3. settle: accept waits on every listener (the backlog holds new clients), and so does the
   next request of a kept-alive connection (unread: the connection moves); a prelude under way
   runs on; parked connections end (reason=shutdown), held ones get the busy answer; children
   started ahead are retired; HTTP connections between requests over TLS end as a drain ends
   them; sessions that cannot move (or a copy that still holds a chunk) get `upgrade_wait` to
   finish, then are ended (reason=shutdown upgrade=1) and their ladders run;
4. the exec: with nothing in flight (no spawn unanswered, no reap unsent), in one step that
   never yields: the record written and sealed, the fds made inheritable, the signals gsrv
   handles blocked (the mask survives execve; the new code unblocks them once its handlers
   are in), execve. An exec that fails undoes all of it and serves on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import AsyncResult
from gevent.socket import wait_read

from gsrv import __version__
from gsrv.errors import SpawnError
from gsrv.service import ADMIN_DRAIN, ADMIN_PAUSE
from gsrv.spawn import wire
from gsrv.state import State
from gsrv.upgrade.moving import idle_packed, packed, ready
from gsrv.upgrade.record import Record, RecordError, write

if TYPE_CHECKING:
    from gsrv.edge.arrival import Visit
    from gsrv.logs import Log
    from gsrv.server import Server
    from gsrv.service import Service
    from gsrv.spawn.client import Spawner
    from gsrv.spawn.guardian import Guardian

RECORD_ENV = "GSRV_UPGRADE_RECORD"  # the record's fd number, for the new code
PREVIOUS_ENV = "GSRV_UPGRADE_PREVIOUS"  # with --exec: the running code's executable and argv (JSON), to fall back to
FAILED_ENV = "GSRV_UPGRADE_FAILED"  # a fallback's: why the newer code's takeover failed
HELD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD}
CHECK_TIMEOUT_S = 60.0  # the new code's import and config parse
CHECK_OUTPUT_MAX = 64 * 1024
SETTLE_POLL_S = 0.02
ENDED_WAIT_S = 10.0  # beyond kill_grace: the ladders of the sessions ended for the upgrade


@dataclass(frozen=True)
class Target:
    """What runs the new code: the exec's executable and argv, and the check's argv."""

    executable: str
    argv: tuple[str, ...]
    check: tuple[str, ...]

    @classmethod
    def of(cls, exec_path: str | None, config: str, overrides: tuple[str, ...]) -> Target:
        """The running executable as it was started (sys.orig_argv), or `exec_path` (a gsrv
        entry point, such as another install's bin/gsrv) with this config and overrides."""
        check_args = ("upgrade", "--check", "--record-fd", "0")
        if exec_path is not None:
            serve = ("serve", "-c", config, *(arg for o in overrides for arg in ("--set", o)))
            return cls(exec_path, (exec_path, *serve), (exec_path, *check_args))
        argv = tuple(sys.orig_argv)
        before = argv[: argv.index("serve", 1)] if "serve" in argv[1:] else (argv[0], "-m", "gsrv")
        return cls(sys.executable, argv, (*before, *check_args))


class Upgrades:
    """One upgrade at a time; `last` says how the last one ended (GET /upgrade), `count` how many
    were asked for in this process's life (carried across each exec)."""

    def __init__(self, server: Server, spawner: Spawner, guardian: Guardian, log: Log,
                 admin_fd: Callable[[], int | None]) -> None:  # fmt: skip
        self.server, self.spawner, self.guardian, self.log = server, spawner, guardian, log
        self.admin_fd = admin_fd
        self.count = 0
        self.running = False
        self.last: dict[str, object] | None = None
        self.counted: Callable[[str], None] = lambda result: None  # gsrv_upgrades_total (the composer's)

    def took_over(self, previous: dict[str, Any], result: dict[str, object]) -> None:
        """This code was an upgrade's exec: the count goes on, `last` is this one's result."""
        self.count = int(previous.get("count", 0))
        self.last = result
        self.counted(str(result["result"]))

    def status(self) -> dict[str, object]:
        return {"count": self.count, "running": self.running, "last": self.last}

    def ask(self, exec_path: str | None, who: dict[str, object], wait: bool = True) -> dict[str, object]:
        """Begin one: with `wait`, until the check answered: {"upgrade": N, "result": "exec"} (the
        exec follows), or {"result": "refused", "why": ...}."""
        why = self._refusal()
        if why is not None:
            self.log.warning("upgrade", result="refused", why=why, **who)
            self.counted("refused")
            return {"result": "refused", "why": why}
        self.count += 1
        self.running = True
        decided: AsyncResult = AsyncResult()
        gevent.spawn(self._run, self.count, exec_path, who, decided)
        return decided.get(timeout=CHECK_TIMEOUT_S + 5) if wait else {"upgrade": self.count, "result": "asked"}

    def _refusal(self) -> str | None:
        if self.running:
            return f"upgrade {self.count} is running"
        state = self.server.lifecycle.state
        if state not in (State.SERVING, State.PAUSED):
            return f"gsrv is {state.value}: an upgrade needs a serving gsrv"
        return None

    def _run(self, number: int, exec_path: str | None, who: dict[str, object], decided: AsyncResult) -> None:
        config = self.server.config
        target = Target.of(exec_path, config.path, config.overrides)
        self.log.info("upgrade_asked", upgrade=number, exec=target.executable, **who)
        began = time.monotonic()
        try:
            why = self._check(target, number)
        except Exception as e:  # a bug here must not leave the upgrade running forever
            why = f"{type(e).__name__}: {e}"
        if why is not None:
            self._end(number, "refused", why, decided)
            return
        decided.set({"upgrade": number, "result": "exec"})
        try:
            ended = self._settle()
            if not self._quiet():
                raise RecordError("sessions or spawns were still in flight after the ended ones' ladders")
            state = self.server.lifecycle.state
            if state not in (State.SERVING, State.PAUSED):  # a SIGTERM while it settled: the stop goes on
                raise RecordError(f"gsrv began to stop ({state.value}) while the upgrade settled: no exec")
            self._exec(target, number, who, began, ended)
        except Exception as e:
            self._resume()
            self._end(number, "failed", f"{type(e).__name__}: {e}", decided)

    def _end(self, number: int, result: str, why: str, decided: AsyncResult) -> None:
        self.running = False
        self.last = {"upgrade": number, "result": result, "why": why}
        self.log.error("upgrade", upgrade=number, result=result, why=why, next="serving on with this code")
        self.counted(result)
        if not decided.ready():
            decided.set({"upgrade": number, "result": result, "why": why})

    # -- the check ----------------------------------------------------------------------

    def _check(self, target: Target, number: int) -> str | None:
        """The new code's answer to the record of now: None for ok, else why not."""
        busy = sorted({s.svc.name for s in self.server.all_sessions()})
        record_fd = write(self._record(target, number, {"busy_services": busy}, ()))
        out, theirs = os.pipe2(os.O_CLOEXEC)
        try:
            process = self.spawner.spawn(target.check, target.executable, dict(os.environ), None, 0o077,
                                         (record_fd, theirs, theirs), at_exit=wire.HOLD)  # fmt: skip
        except SpawnError as e:
            os.close(out)
            return f"cannot start the new code's check: {e}"
        finally:
            os.close(theirs)
            os.close(record_fd)
        try:
            text = self._read_all(out, time.monotonic() + CHECK_TIMEOUT_S)
            if not process.exited.wait(CHECK_TIMEOUT_S) and process.pid:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)  # held as a zombie until the reap: its own group
                process.exited.wait(CHECK_TIMEOUT_S)
        finally:
            os.close(out)
            self.spawner.reap(process)
        if process.error is not None:
            return f"cannot start the new code's check ({' '.join(target.check)}): {process.error}"
        code = os.waitstatus_to_exitcode(process.status) if process.status is not None else None
        lines = [line for line in text.splitlines() if line.strip()]
        if code == 0 and lines and lines[-1].startswith("upgrade_check ok"):
            self.log.info("upgrade_checked", upgrade=number, answer=lines[-1])
            return None
        said = next((line for line in reversed(lines) if line.startswith("upgrade_check refused: ")), None)
        if said is not None:
            return said.removeprefix("upgrade_check refused: ")
        return f"the new code's check exited {code} saying: {' | '.join(lines[-5:]) or 'nothing'}"

    @staticmethod
    def _read_all(fd: int, deadline: float) -> str:
        os.set_blocking(fd, False)
        data = b""
        while len(data) < CHECK_OUTPUT_MAX:
            try:
                chunk = os.read(fd, CHECK_OUTPUT_MAX - len(data))
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError, gevent.Timeout):
                    wait_read(fd, timeout=left)
                continue
            if not chunk:
                break
            data += chunk
        return data.decode("utf-8", "replace")

    # -- settle, and back ----------------------------------------------------------------

    def _settle(self) -> int:
        """Accept paused; what cannot move finishes within upgrade_wait or is ended; returns
        how many sessions were ended."""
        server = self.server
        for service in server.services:
            service.gate.settle()
            service.keepalive.close_tls()  # plain ones between requests move
            service.prespawned.retire("upgrade")
        deadline = time.monotonic() + server.config.server.upgrade_wait
        while not self._quiet() and time.monotonic() < deadline:
            gevent.sleep(SETTLE_POLL_S)
        ended = [s for s in server.all_sessions() if not ready(s)]  # or a copy still holding a chunk
        for session in ended:
            session.end_fields["upgrade"] = 1
            session.abort("shutdown")
        deadline = time.monotonic() + server.config.server.kill_grace + ENDED_WAIT_S
        while not self._quiet() and time.monotonic() < deadline:
            gevent.sleep(SETTLE_POLL_S)
        return len(ended)

    def _quiet(self) -> bool:
        """Nothing but sessions that move: no connection between accept and its session, no
        spawn or ladder in flight, every session ready to move now."""
        server = self.server
        services = [*server.services, *server.retired]
        return (all(s.gate.settled and not s.prespawned.stopping for s in services) and self.spawner.quiet
                and all(ready(s) for s in server.all_sessions()) and not server.retired)  # fmt: skip

    def _resume(self) -> None:
        for service in self.server.services:
            service.gate.settle(False)
            service.prespawned.fill()

    # -- the record and the exec ---------------------------------------------------------

    def _idle(self) -> list[tuple[Service, Visit, float]]:
        """HTTP connections between requests (or whose next request waits at the paused gate,
        unread: they have the whole between_requests again), plain ones (TLS ones were ended)."""
        idle = []
        for service in self.server.services:
            http = service.cfg.interact.http
            between = http.between_requests if http is not None else 0.0
            idle += [(service, visit, left) for visit, left in service.keepalive.idle()]
            idle += [(service, visit, between) for visit in service.gate.knocking if visit.prelude.tls is None]
        return idle

    def _record(self, target: Target, number: int, state: dict[str, Any], moving: tuple[Any, ...]) -> Record:
        """The record: `moving` is every (values, fds) that moves; the sessions' values are also
        under "sessions" (`state` may add "idle": the connections between requests)."""
        config, fds = self.server.config, self._fds()
        for _values, moving_fds in moving:
            fds.update(moving_fds)
        spawner = self.spawner
        sessions = [values for values, moving_fds in moving if any(r.startswith("session:") for r in moving_fds)]
        listens = {f"listener:{s.cfg.name}": str(s.cfg.listen) for s in self.server.services}
        if config.admin is not None:
            listens["admin"] = str(config.admin.listen)
        carried = {"spawner": spawner.handed_over(), "sessions": sessions, "listens": listens,
                   "cgroup_root": config.cgroup.root, **state}  # fmt: skip
        return Record(sys.executable, tuple(sys.orig_argv), __version__, config.path, config.overrides, fds, carried)

    def _fds(self) -> dict[str, int]:
        """The fds that move, by role: listeners, the admin listener, the helpers' ends."""
        fds: dict[str, int] = {}
        for service in self.server.services:
            if service.listener is not None and not service.listener.closed:
                fds[f"listener:{service.cfg.name}"] = service.listener.socket.fileno()
        admin = self.admin_fd()
        if admin is not None:
            fds["admin"] = admin
        spawner, guardian = self.spawner, self.guardian
        if spawner.sock is not None:
            fds["spawner"] = spawner.sock.fileno()
        fds["spawner:stderr"] = spawner.stderr_fd
        fds["guardian"] = guardian.fd
        fds["guardian:stderr"] = guardian.stderr_fd
        return fds

    def _exec(self, target: Target, number: int, who: dict[str, object], began: float, ended: int) -> None:
        """From its caller's last look at `_quiet` on, nothing yields: the state is read, written and
        handed over in one step (the log's queued lines too: the record carries them)."""
        server = self.server
        sessions = tuple(packed(s) for s in server.all_sessions())
        idle = tuple(idle_packed(visit, service.cfg.name, left) for service, visit, left in self._idle())
        missing = [fd for fd in self._fds().values() if fd < 0]
        if missing:  # a lost guardian or spawner fd is caught here, not by the guardian's EOF
            raise RecordError(f"a helper's fd is gone ({self._fds()}): no exec")
        self.log.info("upgrade_exec", upgrade=number, executable=target.executable, moving=len(sessions),
                      ended=ended)  # fmt: skip
        state = {"upgrade": {"number": number, "count": self.count, "who": who, "began_wall": time.time(),
                             "settled_ms": round((time.monotonic() - began) * 1000, 1), "ended": ended,
                             "from_version": __version__, "exec_at": time.monotonic()},
                 "server": {"ids_given": server.ids_given},
                 "operator": {s.cfg.name: sorted(s.gate.paused & {ADMIN_PAUSE, ADMIN_DRAIN}) for s in server.services},
                 "metrics": server.metrics.handed_over() if server.metrics is not None else {},
                 "guardian": self.guardian.handed_over(),
                 "log": self.log.handed_over()}  # fmt: skip
        state["idle"] = [values for values, _fds in idle]
        record = self._record(target, number, state, (*sessions, *idle))
        fd = write(record)
        inherited = [*record.fds.values(), fd]
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        try:
            for each in inherited:
                os.set_inheritable(each, True)
            env = {**os.environ, RECORD_ENV: str(fd)}
            if (target.executable, target.argv) != (sys.executable, tuple(sys.orig_argv)):  # --exec: another code
                env[PREVIOUS_ENV] = json.dumps([sys.executable, *sys.orig_argv])
            os.execve(target.executable, list(target.argv), env)
        except OSError as e:
            for each in inherited:
                with contextlib.suppress(OSError):
                    os.set_inheritable(each, False)
            os.close(fd)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.log.take_over(record.state["log"])
            raise RecordError(f"execve {target.executable}: {e.strerror}") from None
