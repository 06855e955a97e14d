"""The services and their lifecycle: serve, the memory guard's pauses, reload, drain, stop.

The state (gsrv/state.py) decides; the server applies each change to every service's gate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import gevent

from gsrv.accept.listeners import BindError
from gsrv.config.parse import Config, ServerConfig, load
from gsrv.errors import ConfigError
from gsrv.logs import Log
from gsrv.ops.metrics import Metrics, ServiceState
from gsrv.periodic import in_slices
from gsrv.relay.child import REAP_TIMEOUT_S, Launcher
from gsrv.relay.describe import described
from gsrv.relay.session import Session
from gsrv.relay.watchdog import Watchdog
from gsrv.service import MEMORY_PAUSE, Service
from gsrv.state import Lifecycle

DRAIN_POLL_S = 0.05
OWN_GREENLETS = 7  # with an admin endpoint: main, signal worker, watchdog, guard, log writer, metrics flusher,
# the status page's sampler
STOP_MARGIN_S = 1.0
EXIT_MARGIN_S = 3.0  # after the sessions: the admin endpoint, the guardian, the cgroups, the log


def longest_stop(server: ServerConfig) -> float:
    """The longest a stop on SIGTERM takes: the announcement, the drain, the ladder's end
    (_end_sessions), then the exit. A supervisor's stop timeout must exceed it."""
    ladder_end = server.kill_grace + REAP_TIMEOUT_S + STOP_MARGIN_S
    return server.drain_announce + server.drain_timeout + ladder_end + EXIT_MARGIN_S


class Server:
    def __init__(self, config: Config, log: Log, launcher: Launcher) -> None:
        self.config = config
        self.launcher = launcher
        self.log = log
        self.lifecycle = Lifecycle(log)
        self.services = [Service(self, cfg) for cfg in config.services]
        self.retired: set[Service] = set()  # removed by a reload, their sessions draining
        self.metrics: Metrics | None = None  # set by the composer when an admin endpoint exists
        self.watchdog = Watchdog()
        self.stopped = self.lifecycle.stopped
        self.ids_given = 0  # session ids given (an upgrade carries it: ids stay unique at the same pid)
        self._pid = os.getpid()
        self._announcer: gevent.Greenlet | None = None
        self._drainer: gevent.Greenlet | None = None

    def next_session_id(self) -> str:
        self.ids_given += 1
        return f"{self._pid}-{self.ids_given}"

    def bind(self, taken: Callable[[str, str], int | None] | None = None) -> None:
        """Bind every listener, or none: raises BindError naming the service and address.
        `taken`: an upgrade's new code takes each service's listener by its role and address."""
        try:
            for service in self.services:
                role, address = f"listener:{service.cfg.name}", str(service.cfg.listen)
                service.bind(taken(role, address) if taken is not None else None)
        except BindError:
            self.stop_listening()
            raise

    def stop_listening(self) -> None:
        """Close every listener (a startup that failed after binding)."""
        for service in self.services:
            service.close("stopping")

    def start(self) -> None:
        self.watchdog.start()
        for service in self.services:
            assert service.listener is not None
            self._listen(service)
        self.lifecycle.serve()

    def _listen(self, service: Service) -> None:
        assert service.listener is not None
        service.listener.start()  # accepts only if its gate agrees (a pause may predate it)
        service.prespawned.fill()
        via = str(service.cfg.listen) if service.cfg.listen.inherited else None
        self.log.info("listening", service=service.cfg.name, address=service.address, via=via)

    # -- memory pressure (wired to the guard by the composer) ------------------------------

    def pause_accept(self, reason: str, *_sample: object) -> None:
        self.lifecycle.pressure(True)
        for service in self.services:
            service.gate.pause(MEMORY_PAUSE)

    def resume_accept(self, *_sample: object) -> None:
        self.lifecycle.pressure(False)
        for service in self.services:
            service.gate.resume(MEMORY_PAUSE)
            service.prespawned.fill()  # the guard's pause stopped the refill

    @property
    def active_sessions(self) -> int:
        self.retired = {s for s in self.retired if s.sessions or s.prespawned.stopping or s.gate.spawning}
        return sum(len(s.sessions) for s in self.services) + sum(len(s.sessions) for s in self.retired)

    def _every_service(self) -> list[Service]:
        """The running config's services and those a reload removed, while they drain."""
        return [*self.services, *self.retired]

    def _busy(self) -> bool:
        """Sessions left, or children started ahead still on their way out (their ladders)."""
        return bool(self.active_sessions) or any(s.prespawned.stopping or s.gate.spawning
                                                 for s in self._every_service())  # fmt: skip

    def all_sessions(self) -> list[Session]:
        return [session for s in self._every_service() for session in s.sessions]

    # -- what monitoring reads ------------------------------------------------------------

    def service_states(self) -> list[ServiceState]:
        """Each service of the running config now: the scrape's figures and /services' list."""
        not_ready = self.lifecycle.not_ready()
        return [
            ServiceState(
                s.cfg.name,
                len(s.sessions),
                s.gate.active >= s.gate.max_sessions,
                s.listen_queue(),
                s.gate.waiting,
                s.detached,
                s.gate.max_sessions,
                tuple(sorted(s.gate.paused)),
                s.address if s.listener else str(s.cfg.listen),
                s.cfg.interact.transport,
                (not_ready or s.not_ready()) is None,
            )  # fmt: skip
            for s in self.services
        ]

    def greenlets(self) -> int:
        """The sessions' greenlets (each runs in one, plus its pumps), the preludes (TLS
        handshakes, PROXY headers) and gsrv's own."""
        preludes = sum(s.gate.pending for s in self._every_service())
        return sum(1 + session.greenlets for session in self.all_sessions()) + preludes + OWN_GREENLETS

    def flush_metrics(self) -> None:
        """Feed byte and backpressure counters from running sessions (about once a second)."""
        if self.metrics is None:
            return
        for session in in_slices(self.all_sessions()):
            self.metrics.flush(session.svc.name, session.meters())

    # -- the operator's view (ops/control.py asks, for the admin listener) ------------------

    def sessions(self, service: str | None = None, waiting: str | None = None) -> Iterator[dict[str, object]]:
        """Every running session (of `service`, waiting on `waiting`), described as the walk
        reaches it; the walk leaves the loop to the relays between slices (in_slices)."""
        chosen = [s for s in self.all_sessions() if service is None or s.svc.name == service]
        for fields in in_slices(described(chosen)):
            if waiting is None or fields["waiting"] == waiting:
                yield fields

    def end_session(self, sid: str, who: dict[str, object]) -> bool:
        """The operator ends one session: its stop ladder, reason ended_by_admin. False: no such session."""
        session = next((s for s in self.all_sessions() if s.sid == sid), None)
        if session is None:
            return False
        self.log.info("admin_action", action="end", service=session.svc.name, session=sid, **who)
        session.abort("ended_by_admin")
        return True

    def act(self, name: str, action: str, who: dict[str, object]) -> bool:
        """pause, resume or drain one service (the operator's; a reload keeps it, a restart
        clears it). False: no such service."""
        service = self._service(name)
        if service is None:
            return False
        self.log.info("admin_action", action=action, service=name, **who)
        if action == "pause":
            service.admin_pause()
        elif action == "resume":
            service.admin_resume()
        else:
            service.admin_drain(self.config.server.drain_timeout, lambda s: s.abort("ended_by_admin"))
        return True

    def list_services(self) -> list[dict[str, object]]:
        """Each service's state now: sessions, max, waiting, pauses, readiness."""
        return [state.listed() for state in self.service_states()]

    def service_readiness(self, name: str) -> str | None:
        """Why the service takes no new sessions now (None: it does). KeyError: no such service."""
        service = self._service(name)
        if service is None:
            raise KeyError(name)
        return self.lifecycle.not_ready() or service.not_ready()

    def _service(self, name: str) -> Service | None:
        """The running config's service of that name."""
        return next((s for s in self.services if s.cfg.name == name), None)

    # -- reload --------------------------------------------------------------------------

    def reload(self) -> Config | None:
        """Re-read the config file; swap only a valid one (returned). Running sessions keep theirs."""
        try:
            new = load(self.config.path, self.config.overrides, self.config.cgroup)
        except ConfigError as e:
            self.log.error("reload_failed", error=str(e), next="keeping the running config")
            return None
        refused = self._cgroups_refuse(new)
        if refused:
            self.log.error("reload_failed", error=refused, next="keeping the running config")
            return None
        changes = self._apply(new)
        self.config = Config(new.path, new.server, tuple(s.cfg for s in self.services), new.guard, new.overrides,
                             self.config.admin, self.config.cgroup)  # fmt: skip
        self.log.configure(new.server.log_level, new.server.log_format)
        self.log.info("reloaded", path=new.path, **{k: ",".join(v) for k, v in changes.items() if v})
        return self.config

    def _cgroups_refuse(self, new: Config) -> str | None:
        """Why the new config cannot run on the cgroups in use, if it cannot: the root is fixed
        at start, and on v2 a limit new to this config needs its controller enabled first."""
        running = self.config.cgroup.root
        if new.cgroup.root != running:
            return (f"{new.path}: [cgroup] root cannot change on reload (running: \"{running}\", file: "
                    f"\"{new.cgroup.root}\"): restart gsrv to change it")  # fmt: skip
        if self.launcher.root is not None:
            try:
                self.launcher.root.enable(set().union(*(s.contain.limits.controllers(self.launcher.root.host.mode)
                                                  for s in new.services if s.contain.scope == "cgroup")))  # fmt: skip
            except OSError as e:
                return f"{new.path}: [cgroup] {e.strerror or e}"
        return None

    def _apply(self, new: Config) -> dict[str, list[str]]:
        """Swap services to the new config: a listener whose address is unchanged keeps its
        socket (and backlog); new or moved addresses are bound before the old one closes."""
        changes: dict[str, list[str]] = {"added": [], "removed": [], "rebound": [], "updated": [], "failed": []}
        old = {s.cfg.name: s for s in self.services}
        kept: list[Service] = []
        for cfg in new.services:
            current = old.pop(cfg.name, None)
            if current is not None and cfg.listen == current.cfg.listen:
                current.configure(cfg)
                kept.append(current)
                changes["updated"].append(cfg.name)
                continue
            fresh = Service(self, cfg)
            try:
                fresh.bind()
            except BindError as e:
                self.log.error("reload_bind_failed", service=cfg.name, error=str(e), next="fix and reload again")
                changes["failed"].append(cfg.name)
                if current is not None:
                    kept.append(current)  # keep serving on the old address
                continue
            if self.lifecycle.closing:  # a reload in the drain, or after it, opens nothing
                fresh.close("draining")
            else:
                self._listen(fresh)
            kept.append(fresh)
            if current is not None:
                self._retire(current)
                changes["rebound"].append(cfg.name)
            else:
                changes["added"].append(cfg.name)
        for name, gone in old.items():
            self._retire(gone)
            changes["removed"].append(name)
        self.services = kept
        return changes

    def _retire(self, service: Service) -> None:
        """A service the reload removed or moved: no new sessions; running ones go on."""
        service.close("removed")
        if service.sessions or service.prespawned.stopping or service.gate.spawning:
            self.retired.add(service)

    # -- drain and stop ------------------------------------------------------------------

    def begin_stop(self) -> None:
        """SIGTERM/SIGINT: announce the stop for drain_announce (readiness fails, the listeners
        still accept, so a balancer moves new clients away before any is refused), then drain."""
        announce = self.config.server.drain_announce
        if not announce:
            self.drain()
            return
        if not self.lifecycle.announce():
            return
        self.log.info("announcing", sessions=self.active_sessions, drain_announce_s=announce, next="drain")
        self._announcer = gevent.spawn_later(announce, self.drain)

    def drain(self) -> None:
        """Stop taking sessions, let running ones finish up to drain_timeout, then end them."""
        if not self.lifecycle.drain():
            return
        for service in self.services:
            service.close("draining")
        self._drainer = gevent.spawn(self._drain)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.config.server.drain_timeout
        self.log.info("draining", sessions=self.active_sessions, drain_timeout_s=self.config.server.drain_timeout)
        while self._busy() and time.monotonic() < deadline:
            gevent.sleep(DRAIN_POLL_S)
        self._end_sessions()

    def force_stop(self) -> None:
        """A second signal: end every session now (an announcement too)."""
        if self._announcer is not None:
            self._announcer.kill(block=False)
        self.drain()
        if self._drainer is not None:
            self._drainer.kill()
        gevent.spawn(self._end_sessions)

    def _end_sessions(self) -> None:
        if self.stopped.is_set():
            return
        for service in self._every_service():
            service.ending = True  # a session whose spawn is still in flight ends as it starts
        for session in self.all_sessions():
            session.abort("shutdown")
        # Each session now resets its client and runs its stop ladder: TERM, kill_grace, KILL,
        # then at most REAP_TIMEOUT_S for the group to be gone.
        deadline = time.monotonic() + self.config.server.kill_grace + REAP_TIMEOUT_S + STOP_MARGIN_S
        while self._busy() and time.monotonic() < deadline:
            gevent.sleep(DRAIN_POLL_S)
        self.watchdog.stop()
        self.lifecycle.stop()  # the drainer and a forced stop may both get here
