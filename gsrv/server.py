"""Services to listeners and gates, and the lifecycle: serve, reload, drain, stop.

STARTING -> SERVING <-> PAUSED -> DRAINING -> STOPPED; one _set_state() logs every change.
"""

from __future__ import annotations

import enum
import itertools
import os
import socket as stdsocket
import time
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent.event import Event

from gsrv.config import Config, ServiceConfig, load
from gsrv.errors import ConfigError, GsrvError
from gsrv.gate import Gate, Listener
from gsrv.logs import Log
from gsrv.session import Session
from gsrv.watchdog import Watchdog

DRAIN_POLL_S = 0.05


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    PAUSED = "paused"  # the memory guard holds accept on every listener
    DRAINING = "draining"
    STOPPED = "stopped"


class BindError(GsrvError):
    """A service's address could not be bound."""


class Service:
    """One configured service: its listener, its gate, its live sessions."""

    def __init__(self, server: Server, cfg: ServiceConfig) -> None:
        self.server = server
        self.cfg = cfg
        self.gate: Gate[Session] = Gate(cfg.name, cfg.max_sessions, server.log, self.open_session, self.run_session)
        self.sessions: set[Session] = set()
        self.listener: Listener | None = None
        if server.memory_paused:  # a service added under pressure starts paused
            self.gate.pause("memory")

    def bind(self) -> None:
        address = self.cfg.listen
        family = stdsocket.AF_INET6 if address.is_v6 else stdsocket.AF_INET
        sock = gsocket.socket(family, stdsocket.SOCK_STREAM)
        try:
            sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
            sock.bind((address.host, address.port))
            sock.listen(self.cfg.backlog)
        except OSError as e:
            sock.close()
            raise BindError(f"service {self.cfg.name}: cannot listen on {address}: {e.strerror}") from None
        self.listener = Listener(sock, self.gate)
        self.gate.attach(self.listener)

    @property
    def address(self) -> str:
        assert self.listener is not None
        host, port = self.listener.socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def open_session(self, sock: Any, address: Any) -> Session:
        server = self.server
        sid = server.next_session_id()
        return Session(self.cfg, server.config.server, sock, address[:2], sid, server.log, server.watchdog)

    def run_session(self, session: Session) -> None:
        self.sessions.add(session)
        try:
            session.run()
        finally:
            self.sessions.discard(session)


class Server:
    def __init__(self, config: Config, log: Log) -> None:
        self.config = config
        self.log = log
        self.state = State.STARTING
        self.memory_paused = False
        self.services = [Service(self, cfg) for cfg in config.services]
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
            for service in self.services:
                if service.listener is not None:
                    service.listener.close()
            raise

    def start(self) -> None:
        self.watchdog.start()
        for service in self.services:
            assert service.listener is not None
            service.listener.start()  # accepts only if its gate agrees (a pause may predate it)
            self.log.info("listening", service=service.cfg.name, address=service.address)
        self._set_state(State.PAUSED if self.memory_paused else State.SERVING)

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
        return sum(len(s.sessions) for s in self.services)

    # -- reload --------------------------------------------------------------------------

    def reload(self) -> Config | None:
        """Re-read the config file; swap only a valid one (returned). Running sessions keep theirs."""
        try:
            new = load(self.config.path)
        except ConfigError as e:
            self.log.error("reload_failed", error=str(e), next="keeping the running config")
            return None
        by_name = {s.cfg.name: s for s in self.services}
        for cfg in new.services:
            service = by_name.pop(cfg.name, None)
            if service is None:
                self._skipped(cfg.name, "new service", "restart gsrv to add it")
            elif cfg.listen != service.cfg.listen:
                self._skipped(cfg.name, "listen changed", "restart gsrv to rebind")
            else:
                service.cfg = cfg
                service.gate.set_limit(cfg.max_sessions)
        for name in by_name:
            self._skipped(name, "service removed", "restart gsrv to remove it")
        self.config = Config(new.path, new.server, tuple(s.cfg for s in self.services), new.guard)
        self.log.configure(new.server.log_level, new.server.log_format)
        self.log.info("reloaded", path=new.path, services=len(self.services))
        return self.config

    def _skipped(self, name: str, why: str, next_step: str) -> None:
        self.log.warning("reload_skipped", service=name, why=why, next=next_step)

    # -- drain and stop ------------------------------------------------------------------

    def drain(self) -> None:
        """Stop taking sessions, let running ones finish up to drain_timeout, then end them."""
        if self.state not in (State.SERVING, State.PAUSED):
            return
        self._set_state(State.DRAINING)
        for service in self.services:
            service.gate.pause("draining")
            service.gate.drop_parked("shutdown")
            if service.listener is not None:
                service.listener.close()  # queued clients are refused now, not timed out later
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
        for service in self.services:
            for session in list(service.sessions):
                session.abort("shutdown")
        # Each session now runs its stop ladder; bounded by kill_grace plus the reap timeout.
        deadline = time.monotonic() + self.config.server.kill_grace + 10
        while self.active_sessions and time.monotonic() < deadline:
            gevent.sleep(DRAIN_POLL_S)
        self.watchdog.stop()
        if not self.stopped.is_set():  # the drainer and a forced stop may both get here
            self._set_state(State.STOPPED)
