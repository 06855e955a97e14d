"""One configured service: its listener, its gate, and the gate's handler, which takes each
connection along its one path: arrive (the door's screen) -> prelude (PROXY, TLS) -> start (a
Session asks for its command) -> spawned (the spawner started it) -> run. A connection refused
on the way never becomes a Session: the edge's Refusals end it, with the same session_end line
and counters.
"""

from __future__ import annotations

import os
import socket as stdsocket
import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import gevent

from gsrv.accept.gate import Gate
from gsrv.accept.handler import ENDED
from gsrv.accept.listeners import Listener, close_listener, open_listener, take_listener, tune
from gsrv.config.address import host_port
from gsrv.config.parse import Config, ServiceConfig
from gsrv.edge.arrival import Arrival, Prelude, Visit
from gsrv.edge.door import Door
from gsrv.edge.hello import Declined, Hello
from gsrv.edge.keepalive import KeepAlive
from gsrv.edge.keepalive import close as close_between
from gsrv.edge.refusal import Refusals
from gsrv.edge.upgrade import console_site
from gsrv.errors import RESOURCE_ERRORS
from gsrv.logs import Log
from gsrv.ops.metrics import Metrics
from gsrv.relay.child import Child, Launcher
from gsrv.relay.prespawn import Prespawned
from gsrv.relay.relays import Relay
from gsrv.relay.session import Session
from gsrv.relay.watchdog import Watchdog
from gsrv.relay.ws.reattach import Link
from gsrv.state import Lifecycle

ADMIN_PAUSE, ADMIN_DRAIN = "paused_by_admin", "drained_by_admin"  # the operator's reasons in the gate
MEMORY_PAUSE = "memory"  # the memory guard's


class Holder(Protocol):
    """What a service uses of the server that holds it."""

    config: Config
    log: Log
    lifecycle: Lifecycle
    watchdog: Watchdog
    launcher: Launcher
    metrics: Metrics | None

    def next_session_id(self) -> str: ...


class Service:
    """One service's listener, gate and live sessions; the gate's handler (accept.gate.Handler)."""

    def __init__(self, server: Holder, cfg: ServiceConfig) -> None:
        self.server = server
        self.cfg = cfg
        self.refusals = Refusals(cfg.name, server.log, self._refused)
        self.door = Door(cfg.policy, self.refusals, self._join)  # configure() gives it the rest
        self.gate: Gate[Visit, Session] = Gate(cfg.name, cfg.max_sessions, server.log, self)
        self.keepalive = KeepAlive(self._next_request)  # HTTP connections between requests
        self.sessions: set[Session] = set()
        self.tokens: dict[str, Session] = {}  # reattach, share: a session by its tokens
        self.ending = False  # the stop ended the sessions: one that starts now ends at once
        self._drainer: gevent.Greenlet | None = None  # the operator's drain: its deadline
        self.listener: Listener | None = None
        self._address = str(cfg.listen)  # until bound
        self.prespawned = Prespawned(cfg, server.launcher, server.log, server.config.server.kill_grace, self._accepts)
        self.configure(cfg)
        if server.lifecycle.memory_pressure:  # a service added under pressure starts paused
            self.gate.pause(MEMORY_PAUSE)

    def configure(self, cfg: ServiceConfig) -> None:
        """Take a (reloaded) config: limits, rules and certificates apply to new connections."""
        self.cfg = cfg
        ws = cfg.interact.websocket
        typed = cfg.interact.pty or cfg.stderr == "websocket"
        site = console_site(ws, typed, cfg.interact.pty) if ws and ws.console else {}
        self.door.update(cfg.policy, ws, site, cfg.interact.http, cfg.interact.auth)
        self.gate.set_limits(cfg.max_sessions, cfg.policy.max_pending)
        p = cfg.policy  # the memory guard's pause answers those held; an operator's, with busy_on_pause, all
        operator = frozenset({ADMIN_PAUSE, ADMIN_DRAIN} if p.busy_on_pause else ())
        self.gate.set_queue(p.queue_timeout, p.queue_max, frozenset({MEMORY_PAUSE}) | operator, operator)
        if self.listener is not None and not self.listener.closed:
            tune(self.listener.socket, cfg.keepalive)
        self.prespawned.configure(cfg, self.server.config.server.kill_grace)

    def _accepts(self) -> bool:
        """Whether children may be started ahead: listening, and no pause (memory, a drain)."""
        listener = self.listener
        gate = self.gate
        return listener is not None and listener.started and not (gate.paused or gate.closed or gate.settling)

    def bind(self, taken: int | None = None) -> None:
        """Bind (or inherit) the listener; `taken`: the fd an upgrade's previous code listened on."""
        what = f"service {self.cfg.name}"
        if taken is not None:
            sock = take_listener(what, taken)
        else:
            sock = open_listener(what, self.cfg.listen, self.cfg.backlog, self.cfg.mode, os.environ)
        tune(sock, self.cfg.keepalive)
        name = sock.getsockname()
        self._address = f"unix:{name}" if sock.family == stdsocket.AF_UNIX else host_port(name[0], name[1])
        self.listener = Listener(sock, self.gate)
        self.gate.attach(self.listener)

    def close(self, why: str) -> None:
        """Stop taking sessions: a socket gsrv bound is closed (queued clients are refused at
        once, not left to time out); an inherited one only stops accepting here."""
        self.gate.pause(why)
        self.gate.close("shutdown")
        if self._drainer is not None:  # a stop (or a reload that removed it) drains it its own way
            self._drainer.kill(block=False)
        self.keepalive.close_all()
        self.prespawned.retire(why)
        if self.listener is not None and not self.listener.closed:
            if self.cfg.listen.inherited:
                self.listener.socket.detach()  # the fd stays open for whoever else serves it
            else:
                sock = self.listener.socket
                self.listener.close()
                close_listener(sock, self.cfg.listen)

    @property
    def address(self) -> str:
        """The address bound (the kernel's port for port 0), also once the listener closed."""
        return self._address

    # -- the gate's handler ----------------------------------------------------------------

    @property
    def has_prelude(self) -> bool:
        return self.door.has_prelude

    def arrive(self, sock: Any, address: Any) -> Visit | None:
        visit = Visit(Arrival(sock, address), self.server.next_session_id())
        return visit if self.door.screen(visit) else None

    def prelude(self, visit: Visit) -> Visit | None:
        """The visit with what its prelude found; None when it ended (refused) or a hello handed
        the connection to a running session (JOINED)."""
        found = self.door.prelude(visit)
        return replace(visit, prelude=found) if isinstance(found, Prelude) else None

    def start(self, visit: Visit) -> Session | int | None:
        server = self.server
        session = Session(self.cfg, server.config.server, visit, server.log, server.watchdog, server.launcher,
                          on_end=self._ended)  # fmt: skip
        error = session.start(self.prespawned.take() if self.cfg.interact.prespawn else None)
        if error is None:
            return session
        return self._kept(session, error)

    def spawned(self, session: Session) -> int | None:
        error = session.spawned()
        return None if error is None else self._kept(session, error) or ENDED

    def _kept(self, session: Session, error: int) -> int | None:
        """An errno the gate parks the connection for, or None: the session wrote its line."""
        if error in RESOURCE_ERRORS:
            session.visit.arrival.spawn_error = session.spawn_error
            return error
        return None

    def run(self, session: Session) -> None:
        if self.ending:
            session.abort("shutdown")
        self.sessions.add(session)
        tokens = session.relay.tokens if session.relay is not None else ()
        self.tokens.update(dict.fromkeys(tokens, session))
        try:
            session.run()
        finally:
            self.sessions.discard(session)
            for token in tokens:
                del self.tokens[token]
        if session.kept_alive:
            http = self.cfg.interact.http
            if self.gate.closed or http is None:  # a drain, or a reload that ended HTTP here
                close_between(session.visit)
            else:
                self.keepalive.wait(session.visit, http.between_requests)

    def adopt(self, visit: Visit, relay: Relay, child: Child, spawn_seconds: float | None) -> Session:
        """A session an upgrade moved (gsrv/upgrade), its child running: counted against its
        client's address, given its slot, then run as any session."""
        server = self.server
        session = Session(self.cfg, server.config.server, visit, server.log, server.watchdog, server.launcher,
                          relay=relay, on_end=self._ended)  # fmt: skip
        session.child, session.spawn_seconds = child, spawn_seconds
        self.door.counted(visit)
        self.gate.adopt(session)
        return session

    def adopt_idle(self, visit: Visit, left: float) -> None:
        """An HTTP connection an upgrade moved between its requests: counted, and waiting again."""
        self.door.counted(visit)
        self.keepalive.wait(visit, left)

    def _join(self, visit: Visit, hello: Hello) -> None:
        """A terminal page's hello that names a running session (edge/door.py): its reattach
        (the session takes the connection) or a watcher. Raises Declined (a token no session
        has, a reattach by another user than the session's) or ProtocolError."""
        session = self.tokens.get(hello.resume or hello.watch or "")
        if session is None or session.relay is None:
            raise Declined("no_session", "no session of this service has that token (it ended, or never was)")
        upgraded = visit.prelude.websocket
        assert upgraded is not None and upgraded.reader is not None
        peer = str(visit.log_fields()["peer"])
        link = Link(visit.sock, upgraded.stream, upgraded.reader, visit.sid, peer, visit.arrival.ended)
        owner, user = session.visit.prelude.user, visit.prelude.user
        session.relay.join(link, hello, (owner[0] if owner else None) == (user[0] if user else None))

    @property
    def detached(self) -> int:
        """Sessions whose client's connection dropped, kept for a reattach."""
        return sum(1 for s in self.sessions if s.relay is not None and s.relay.detached_since is not None)

    def _next_request(self, visit: Visit) -> None:
        self.gate.knock(visit.next_request(self.server.next_session_id()))

    def drop(self, visit: Visit, reason: str, error: str | None = None) -> None:
        self.refusals.drop(visit, reason, error)

    def busy(self, visit: Visit) -> None:
        self.door.busy(visit)

    # -- counting -------------------------------------------------------------------------

    def _ended(self, session: Session) -> None:
        if self.server.metrics is not None:
            self.server.metrics.ended(self.cfg.name, session)

    def _refused(self, visit: Visit, reason: str) -> None:
        if self.server.metrics is not None:
            http = visit.prelude.http
            self.server.metrics.refused(self.cfg.name, reason, visit.age(), http.status if http is not None else None)

    # -- the operator's pauses and drain (the admin listener's /services/NAME/...) -----------

    def admin_pause(self) -> None:
        """New connections wait in the backlog; running sessions go on (beside the guard's pause)."""
        self.gate.pause(ADMIN_PAUSE)

    def admin_drain(self, timeout: float, end: Callable[[Session], None]) -> None:
        """Paused, and the sessions running now get `timeout` to finish; then `end` for each
        left. The service stays drained until resumed."""
        self.gate.pause(ADMIN_DRAIN)
        if self._drainer is None or self._drainer.dead:
            self._drainer = gevent.spawn_later(timeout, self._drained, end)

    def _drained(self, end: Callable[[Session], None]) -> None:
        for session in list(self.sessions):
            end(session)

    def admin_resume(self) -> None:
        """Only the operator's pauses end here (the guard's and a stop's stay)."""
        if self._drainer is not None:
            self._drainer.kill(block=False)
            self._drainer = None
        self.gate.resume(ADMIN_PAUSE)
        self.gate.resume(ADMIN_DRAIN)
        self.prespawned.fill()

    def not_ready(self) -> str | None:
        """Why this service takes no new sessions now, if it does not (/readyz/NAME)."""
        if self.gate.closed:
            return "closed"
        return ", ".join(sorted(self.gate.paused)) or None

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
