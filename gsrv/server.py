"""Services to listeners and gates, and the lifecycle: serve, reload, drain, stop.

STARTING -> SERVING <-> PAUSED -> DRAINING -> STOPPED; one _set_state() logs every change.
"""

from __future__ import annotations

import enum
import itertools
import os
import socket as stdsocket
import struct
import time
from typing import Any

import gevent
from gevent.event import Event

from gsrv.accept.gate import Gate, Listener
from gsrv.accept.listeners import BindError, close_listener, open_listener, tune
from gsrv.config.parse import Config, ServiceConfig, load
from gsrv.edge.arrival import Arrival
from gsrv.edge.door import Door
from gsrv.errors import ConfigError
from gsrv.logs import Log
from gsrv.ops.metrics import Metrics, ServiceState
from gsrv.relay.session import Session
from gsrv.relay.watchdog import Watchdog

DRAIN_POLL_S = 0.05
OWN_GREENLETS = 6  # main, signal worker, watchdog, guard, log writer, metrics flusher


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    PAUSED = "paused"  # the memory guard holds accept on every listener
    DRAINING = "draining"
    STOPPED = "stopped"


class Service:
    """One configured service: its listener, its gate, its live sessions."""

    def __init__(self, server: Server, cfg: ServiceConfig) -> None:
        self.server = server
        self.cfg = cfg
        self.gate: Gate[Session] = Gate(cfg.name, cfg.max_sessions, server.log, self.open_session, self.run_session)
        self.door = Door(cfg.policy)
        self.sessions: set[Session] = set()
        self.listener: Listener | None = None
        self.configure(cfg)
        if server.memory_paused:  # a service added under pressure starts paused
            self.gate.pause("memory")

    def configure(self, cfg: ServiceConfig) -> None:
        """Take a (reloaded) config: limits, rules and certificates apply to new connections."""
        self.cfg = cfg
        self.door.update(cfg.policy)
        prelude = self.door.prelude if self.door.has_prelude else None
        self.gate.set_limits(cfg.max_sessions, cfg.policy.max_pending, prelude)
        if self.listener is not None:
            tune(self.listener.socket, cfg.keepalive)

    def bind(self) -> None:
        sock = open_listener(f"service {self.cfg.name}", self.cfg.listen, self.cfg.backlog, self.cfg.mode, os.environ)
        tune(sock, self.cfg.keepalive)
        self.listener = Listener(sock, self.gate)
        self.gate.attach(self.listener)

    def close(self, why: str) -> None:
        """Stop taking sessions: a socket gsrv bound is closed (queued clients are refused at
        once, not left to time out); an inherited one only stops accepting here."""
        self.gate.pause(why)
        self.gate.drop_parked("shutdown")
        if self.listener is not None and not self.listener.closed:
            if self.cfg.listen.inherited:
                self.listener.socket.detach()  # the fd stays open for whoever else serves it
            else:
                sock = self.listener.socket
                self.listener.close()
                close_listener(sock, self.cfg.listen)

    @property
    def address(self) -> str:
        assert self.listener is not None
        name = self.listener.socket.getsockname()
        if self.listener.socket.family == stdsocket.AF_UNIX:
            return f"unix:{name}"
        host, port = name[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def open_session(self, sock: Any, address: Any) -> Session | None:
        """The session for an accepted connection, or None when a rule refused it."""
        server = self.server
        sid = server.next_session_id()
        session = Session(self.cfg, server.config.server, Arrival(sock, address), sid, server.log, server.watchdog)
        session.at_end(lambda: self._ended(session))
        return session if self.door.screen(session) else None

    def _ended(self, session: Session) -> None:
        if self.server.metrics is not None:
            self.server.metrics.ended(self.cfg.name, session)

    def run_session(self, session: Session) -> None:
        self.sessions.add(session)
        try:
            session.run()
        finally:
            self.sessions.discard(session)

    def listen_queue(self) -> int | None:
        """Connections waiting in the backlog (TCP_INFO's unacked on a listening socket)."""
        listener = self.listener
        if listener is None or listener.closed or listener.socket.family == stdsocket.AF_UNIX:
            return None
        try:
            info = listener.socket.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_INFO, 32)
        except OSError:
            return None
        return int(struct.unpack_from("I", info, 24)[0])


class Server:
    def __init__(self, config: Config, log: Log) -> None:
        self.config = config
        self.log = log
        self.state = State.STARTING
        self.memory_paused = False
        self.services = [Service(self, cfg) for cfg in config.services]
        self.retired: set[Service] = set()  # removed by a reload, their sessions draining
        self.metrics: Metrics | None = None  # set by the composer when an admin endpoint exists
        self.drain_started: float | None = None
        self.watchdog = Watchdog()
        self.stopped = Event()
        self._ids = itertools.count(1)
        self._pid = os.getpid()
        self._drainer: gevent.Greenlet | None = None

    def next_session_id(self) -> str:
        return f"{self._pid}-{next(self._ids)}"

    def _set_state(self, state: State) -> None:
        self.state = state
        self.log.info("state", state=state.value)
        if state is State.STOPPED:
            self.stopped.set()

    def bind(self) -> None:
        """Bind every listener, or none: raises BindError naming the service and address."""
        try:
            for service in self.services:
                service.bind()
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
        self._set_state(State.PAUSED if self.memory_paused else State.SERVING)

    def _listen(self, service: Service) -> None:
        assert service.listener is not None
        service.listener.start()  # accepts only if its gate agrees (a pause may predate it)
        via = str(service.cfg.listen) if service.cfg.listen.inherited else None
        self.log.info("listening", service=service.cfg.name, address=service.address, via=via)

    # -- memory pressure (wired to the guard by the composer) ------------------------------

    def pause_accept(self, reason: str, *_sample: object) -> None:
        self.memory_paused = True
        for service in self.services:
            service.gate.pause("memory")
        if self.state is State.SERVING:
            self._set_state(State.PAUSED)

    def resume_accept(self, *_sample: object) -> None:
        self.memory_paused = False
        for service in self.services:
            service.gate.resume("memory")
        if self.state is State.PAUSED:
            self._set_state(State.SERVING)

    @property
    def active_sessions(self) -> int:
        self.retired = {s for s in self.retired if s.sessions}
        return sum(len(s.sessions) for s in self.services) + sum(len(s.sessions) for s in self.retired)

    def all_sessions(self) -> list[Session]:
        return [session for s in [*self.services, *self.retired] for session in s.sessions]

    # -- what monitoring reads ------------------------------------------------------------

    def not_ready(self) -> str | None:
        """Why a load balancer should not send new clients here now; None when it may."""
        if self.state in (State.DRAINING, State.STOPPED):
            return "draining"
        if self.memory_paused:
            return "accept paused by the memory guard"
        return None

    def service_states(self) -> list[ServiceState]:
        return [
            ServiceState(
                s.cfg.name,
                len(s.sessions),
                s.gate.active >= s.gate.max_sessions,
                s.listen_queue(),
                s.gate.pending + len(s.gate.ready),
            )  # fmt: skip
            for s in self.services
        ]

    def greenlets(self) -> int:
        """The sessions' greenlets (each runs in one, plus its pumps), the preludes (TLS
        handshakes, PROXY headers) and gsrv's own."""
        preludes = sum(s.gate.pending for s in [*self.services, *self.retired])
        return sum(1 + len(session.greenlets) for session in self.all_sessions()) + preludes + OWN_GREENLETS

    def flush_metrics(self) -> None:
        """Feed byte and backpressure counters from running sessions (about once a second)."""
        if self.metrics is None:
            return
        for service in [*self.services, *self.retired]:
            for session in service.sessions:
                self.metrics.flush(service.cfg.name, session.meters())

    # -- reload --------------------------------------------------------------------------

    def reload(self) -> Config | None:
        """Re-read the config file; swap only a valid one (returned). Running sessions keep theirs."""
        try:
            new = load(self.config.path, self.config.overrides)
        except ConfigError as e:
            self.log.error("reload_failed", error=str(e), next="keeping the running config")
            return None
        changes = self._apply(new)
        self.config = Config(new.path, new.server, tuple(s.cfg for s in self.services), new.guard, new.overrides)
        self.log.configure(new.server.log_level, new.server.log_format)
        self.log.info("reloaded", path=new.path, **{k: ",".join(v) for k, v in changes.items() if v})
        return self.config

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
            if self.state is State.DRAINING:
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
        if service.sessions:
            self.retired.add(service)

    # -- drain and stop ------------------------------------------------------------------

    def drain(self) -> None:
        """Stop taking sessions, let running ones finish up to drain_timeout, then end them."""
        if self.state not in (State.SERVING, State.PAUSED):
            return
        self._set_state(State.DRAINING)
        self.drain_started = time.monotonic()
        for service in self.services:
            service.close("draining")
        self._drainer = gevent.spawn(self._drain)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.config.server.drain_timeout
        self.log.info("draining", sessions=self.active_sessions, drain_timeout_s=self.config.server.drain_timeout)
        while self.active_sessions and time.monotonic() < deadline:
            gevent.sleep(DRAIN_POLL_S)
        self._end_sessions()

    def force_stop(self) -> None:
        """A second signal: end every session now."""
        self.drain()
        if self._drainer is not None:
            self._drainer.kill()
        gevent.spawn(self._end_sessions)

    def _end_sessions(self) -> None:
        if self.stopped.is_set():
            return
        for session in self.all_sessions():
            session.abort("shutdown")
        # Each session now runs its stop ladder; bounded by kill_grace plus the reap timeout.
        deadline = time.monotonic() + self.config.server.kill_grace + 10
        while self.active_sessions and time.monotonic() < deadline:
            gevent.sleep(DRAIN_POLL_S)
        self.watchdog.stop()
        if not self.stopped.is_set():  # the drainer and a forced stop may both get here
            self._set_state(State.STOPPED)
