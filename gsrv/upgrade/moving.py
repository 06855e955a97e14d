"""A session across an upgrade's exec: packed by the previous code into the record's plain
values and fds (`packed`), unpacked by the new code into the parts a Service adopts
(`unpacked`). What moves, between a session's start and its verdict:
- `relay = "socket"`: the child holds the connection, the kernel moves the bytes;
- splice and copy (plain TCP or unix, pipes, no recording): each direction moves from where
  it was (relaying, discarding, done), with its counts; a splice direction never holds a byte,
  a copy direction is `ready` only between chunks (the chunk it read was written).
- the terminal page's sessions with reattach: detached, then reattached by the page
  (upgrade/terminal.py).
Every other session finishes within `upgrade_wait` or is ended before the exec
(gsrv/upgrade/leave.py).
"""

from __future__ import annotations

import base64
import os
from dataclasses import asdict, dataclass
from typing import Any

from gevent import socket as gsocket

from gsrv.config.parse import ServiceConfig
from gsrv.contain.scope import Limits
from gsrv.edge.arrival import Arrival, Prelude, Visit
from gsrv.edge.http import HttpConnection
from gsrv.edge.proxy import ProxyHeader
from gsrv.edge.stream import PlainStream
from gsrv.relay.child import Child, Launcher
from gsrv.relay.childend import Pipes
from gsrv.relay.handoff import SocketRelay
from gsrv.relay.relays import PipeRelay, SpliceRelay
from gsrv.relay.session import Session
from gsrv.relay.stdio import Stdio
from gsrv.relay.ws.relay import WebSocketRelay
from gsrv.spawn.process import Process
from gsrv.upgrade.terminal import terminal_facts, terminal_movable, terminal_relay

PUMPED = {"splice": SpliceRelay, "copy": PipeRelay}  # the pumping relays that move: exactly these classes


def movable(session: Session) -> bool:
    """Running (started, no verdict yet, no end asked for), on a relay that moves, without TLS
    (Python's ssl can neither export a connection's state nor import it)."""
    relay, child = session.relay, session.child
    if not (session.relaying and not session.ending and child is not None and child.pid > 0
            and session.visit.prelude.tls is None):  # fmt: skip
        return False
    if isinstance(relay, SocketRelay):
        return True
    if isinstance(relay, WebSocketRelay):
        return terminal_movable(relay)
    return (type(relay) is PUMPED.get(relay.name if relay is not None else "") and isinstance(relay, PipeRelay)
            and relay.recording is None and isinstance(relay.child_end, Pipes))  # fmt: skip


def ready(session: Session) -> bool:
    """Movable now: no byte in gsrv's hands (a copy direction between its chunks)."""
    relay = session.relay
    return movable(session) and not (isinstance(relay, PipeRelay) and (relay.inbound.holding
                                                                        or relay.outbound.holding))  # fmt: skip


def packed(session: Session) -> tuple[dict[str, Any], dict[str, int]]:
    """A movable session's values and its fds by role (`session:SID:socket`, `...:stderr`)."""
    relay, child, visit = session.relay, session.child, session.visit
    assert isinstance(relay, SocketRelay | PipeRelay) and child is not None
    process, sid = child.process, session.sid
    contained = child.contained
    values = {
        **_visit_values(visit, session.svc.name),
        "relay": relay.name,
        "spawn_seconds": session.spawn_seconds,
        "pumped": None if isinstance(relay, SocketRelay) else _pumped(relay),
        "terminal": terminal_facts(relay) if isinstance(relay, WebSocketRelay) else None,
        "header_length": relay.header_length if isinstance(relay, SocketRelay) else 0,
        "reported": [relay.inbound.reported, relay.outbound.reported,
                     relay.rwnd.reported_blocked if isinstance(relay, SocketRelay) else 0.0],  # the metrics'
        "child": {
            "pid": process.pid, "generation": process.generation, "at_exit": process.at_exit,
            "cgroup": process.cgroup, "status": process.status, "alone": process.alone, "stuck": process.stuck,
            "signals_sent": child.signals_sent,
            "contained": None if contained is None else {**asdict(contained[0]), "accounting": contained[1]},
        },
    }  # fmt: skip
    fds = (
        {} if isinstance(relay, WebSocketRelay) else {f"session:{sid}:socket": relay.sock.fileno()}
    )  # (a page reconnects)
    ends = ("pty", "stderr") if child.pty_master >= 0 else ("stdin", "stdout", "stderr")
    for name in ends:
        fd = child.pty_master if name == "pty" else getattr(child, name)
        if fd >= 0:
            fds[f"session:{sid}:{name}"] = fd
    return values, fds


def _pumped(relay: PipeRelay) -> dict[str, Any]:
    """A pumping relay's own facts: where each direction is, and its meters."""
    return {"chunk": relay.chunk, "phase_in": relay.phase_in, "phase_out": relay.phase_out,
            "input_done": relay.input_done, "client_eof": relay.client_eof, "output_eof": relay.output_eof,
            "meters": [[m.total, m.last, m.blocked, m.reported, m.reported_blocked]
                       for m in (relay.inbound, relay.outbound, relay.discarded)]}  # fmt: skip


def _pumping(relay: PipeRelay, facts: dict[str, Any]) -> PipeRelay:
    relay.phase_in, relay.phase_out = str(facts["phase_in"]), str(facts["phase_out"])
    relay.input_done, relay.client_eof = bool(facts["input_done"]), bool(facts["client_eof"])
    relay.output_eof = bool(facts["output_eof"])
    for meter, (total, last, blocked, reported, reported_blocked) in zip(
        (relay.inbound, relay.outbound, relay.discarded), facts["meters"], strict=True
    ):
        meter.total, meter.last, meter.blocked = int(total), float(last), float(blocked)
        meter.reported, meter.reported_blocked = int(reported), float(reported_blocked)
    return relay


@dataclass(frozen=True)
class Unpacked:
    """A moved session's parts, for its service to adopt (Service.adopt)."""

    service: str
    visit: Visit
    relay: SocketRelay | PipeRelay
    child: Child
    spawn_seconds: float | None


def unpacked(values: dict[str, Any], fds: dict[str, int], launcher: Launcher, svc: ServiceConfig | None,
             eof_grace: float) -> Unpacked:  # fmt: skip
    """The new code's: the parts of a session `packed` described, its fds taken from `fds`
    (by role), for the service's config now (None: the config has no such service). Raises
    KeyError, TypeError or ValueError for values that are not a session's (or that it cannot
    serve: a terminal whose service no longer has a websocket table with reattach)."""
    sid = str(values["sid"])
    pumped, terminal = values["pumped"], values.get("terminal")
    relay: SocketRelay | PipeRelay
    if terminal is not None:
        ws = svc.interact.websocket if svc is not None else None
        if ws is None:
            raise ValueError(f"session {sid}: its service has no websocket table now")
        relay = _pumping(terminal_relay(terminal, ws, int(pumped["chunk"]), eof_grace), pumped)
        sock, fd = relay.sock, -1
    else:
        fd = fds[f"session:{sid}:socket"]
        sock = gsocket.socket(fileno=fd)
        if pumped is None:
            os.set_blocking(fd, True)  # the child's, as the handoff gave it (gevent made it non-blocking)
            relay = SocketRelay(sock, int(values["header_length"]))
            relay.inbound.reported, relay.outbound.reported, relay.rwnd.reported_blocked = values["reported"]
        else:
            relay = _pumping(PUMPED[str(values["relay"])](sock, int(pumped["chunk"])), pumped)
    visit = _visit(values, sock)
    moved = values["child"]
    process = Process(int(moved["generation"]), int(moved["at_exit"]))
    process.pid, process.cgroup, process.alone = int(moved["pid"]), str(moved["cgroup"]), bool(moved["alone"])
    process.stuck = [str(s) for s in moved["stuck"]]
    if moved["status"] is not None:
        process.status = int(moved["status"])
        process.exited.set()
    stdin, stdout, stderr, pty = (fds.get(f"session:{sid}:{name}", -1) for name in ("stdin", "stdout", "stderr", "pty"))
    if pty >= 0:
        stdin = stdout = pty
    contained = moved["contained"]
    limits = None
    if contained is not None:
        limits = (Limits(int(contained["memory"]), int(contained["pids"]), float(contained["cpu"])),
                  bool(contained["accounting"]))  # fmt: skip
    stdio = Stdio((-1, -1, -1), stdin, stdout, stderr, pty, socket=fd if pumped is None else -1)
    signal_in_exit = svc.launch.signal_in_exit if svc is not None else False
    child = Child.moved(process, stdio, limits, signal_in_exit, launcher)
    child.signals_sent = [str(s) for s in moved["signals_sent"]]
    spawn_seconds = values["spawn_seconds"]
    return Unpacked(str(values["service"]), visit, relay, child,
                    None if spawn_seconds is None else float(spawn_seconds))  # fmt: skip


def idle_packed(visit: Visit, service: str, left: float) -> tuple[dict[str, Any], dict[str, int]]:
    """An HTTP connection between its requests (plain: TLS ones end), and the seconds its
    between_requests has left: values and its fd (`idle:SID:socket`)."""
    http = visit.prelude.http
    assert http is not None and visit.prelude.tls is None
    values = {**_visit_values(visit, service), "left": left, "served": http.served,
              "buffered": base64.b64encode(http.buffered).decode()}  # fmt: skip
    return values, {f"idle:{visit.sid}:socket": visit.sock.fileno()}


def idle_unpacked(values: dict[str, Any], fds: dict[str, int]) -> tuple[str, Visit, float]:
    """The service, the connection between its requests, the seconds it has left."""
    sock = gsocket.socket(fileno=fds[f"idle:{values['sid']}:socket"])
    http = HttpConnection(PlainStream(sock), False)
    http.served, http.buffered = int(values["served"]), base64.b64decode(values["buffered"])
    return str(values["service"]), _visit(values, sock, http), float(values["left"])


def _visit_values(visit: Visit, service: str) -> dict[str, Any]:
    prelude = visit.prelude
    return {
        "sid": visit.sid,
        "service": service,
        "started": visit.started,  # CLOCK_MONOTONIC: the same clock after the exec
        "connection_sid": visit.connection_sid,
        "peer": _plain(visit.arrival.peer),
        "client": _plain(prelude.client),
        "header": {k: _plain(v) for k, v in asdict(prelude.header).items()} if prelude.header else None,
        "user": _plain(prelude.user),
    }


def _visit(values: dict[str, Any], sock: gsocket.socket, http: HttpConnection | None = None) -> Visit:
    header = values["header"]
    prelude = Prelude(
        header=ProxyHeader(**{k: _tuple(v) for k, v in header.items()}) if header else None,
        client=_tuple(values["client"]), user=_tuple(values["user"]), http=http,
    )  # fmt: skip
    return Visit(Arrival(sock, _tuple(values["peer"])), str(values["sid"]), float(values["started"]), prelude,
                 str(values["connection_sid"]))  # fmt: skip


def _plain(value: Any) -> Any:
    """A tuple as JSON keeps it (a list); anything else as it is."""
    return list(value) if isinstance(value, tuple) else value


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
