"""A session across an upgrade's exec: packed by the previous code into the record's plain
values and fds (`packed`), unpacked by the new code into the parts a Service adopts
(`unpacked`). What moves today: `relay = "socket"` sessions, whose bytes the kernel moves
(gsrv holds none), between their start and their verdict. Every other session finishes
within `upgrade_wait` or is ended before the exec (gsrv/upgrade/leave.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from gevent import socket as gsocket

from gsrv.contain.scope import Limits
from gsrv.edge.arrival import Arrival, Prelude, Visit
from gsrv.edge.proxy import ProxyHeader
from gsrv.relay.child import Child, Launcher
from gsrv.relay.handoff import SocketRelay
from gsrv.relay.session import Session
from gsrv.relay.stdio import Stdio
from gsrv.spawn.process import Process

MOVES = frozenset({"socket"})  # the relays whose sessions move


def movable(session: Session) -> bool:
    """Running (started, no verdict yet, no end asked for), on a relay that moves, without TLS
    (Python's ssl can neither export a connection's state nor import it)."""
    relay, child = session.relay, session.child
    return (session.relaying and not session.ending and relay is not None and relay.name in MOVES
            and child is not None and child.pid > 0 and session.visit.prelude.tls is None)  # fmt: skip


def packed(session: Session) -> tuple[dict[str, Any], dict[str, int]]:
    """A movable session's values and its fds by role (`session:SID:socket`, `...:stderr`)."""
    relay, child, visit = session.relay, session.child, session.visit
    assert isinstance(relay, SocketRelay) and child is not None
    process, prelude, sid = child.process, visit.prelude, session.sid
    contained = child.contained
    values = {
        "sid": sid,
        "service": session.svc.name,
        "relay": relay.name,
        "started": visit.started,  # CLOCK_MONOTONIC: the same clock after the exec
        "connection_sid": visit.connection_sid,
        "peer": _plain(visit.arrival.peer),
        "client": _plain(prelude.client),
        "header": {k: _plain(v) for k, v in asdict(prelude.header).items()} if prelude.header else None,
        "user": _plain(prelude.user),
        "header_length": relay.header_length,
        "spawn_seconds": session.spawn_seconds,
        "reported": [relay.inbound.reported, relay.outbound.reported, relay.rwnd.reported_blocked],  # the metrics'
        "child": {
            "pid": process.pid, "generation": process.generation, "at_exit": process.at_exit,
            "cgroup": process.cgroup, "status": process.status, "alone": process.alone, "stuck": process.stuck,
            "signals_sent": child.signals_sent,
            "contained": None if contained is None else {**asdict(contained[0]), "accounting": contained[1]},
        },
    }  # fmt: skip
    fds = {f"session:{sid}:socket": relay.fd}
    if child.stderr >= 0:
        fds[f"session:{sid}:stderr"] = child.stderr
    return values, fds


@dataclass(frozen=True)
class Unpacked:
    """A moved session's parts, for its service to adopt (Service.adopt)."""

    service: str
    visit: Visit
    relay: SocketRelay
    child: Child
    spawn_seconds: float | None


def unpacked(values: dict[str, Any], fds: dict[str, int], launcher: Launcher, signal_in_exit: bool) -> Unpacked:
    """The new code's: the parts of a session `packed` described, its fds taken from `fds`
    (by role). Raises KeyError, TypeError or ValueError for values that are not a session's."""
    sid = str(values["sid"])
    fd = fds[f"session:{sid}:socket"]
    sock = gsocket.socket(fileno=fd)
    os.set_blocking(fd, True)  # the child's, as the handoff gave it (gevent made it non-blocking)
    header = values["header"]
    prelude = Prelude(
        header=ProxyHeader(**{k: _tuple(v) for k, v in header.items()}) if header else None,
        client=_tuple(values["client"]), user=_tuple(values["user"]),
    )  # fmt: skip
    visit = Visit(Arrival(sock, _tuple(values["peer"])), sid, float(values["started"]), prelude,
                  str(values["connection_sid"]))  # fmt: skip
    moved = values["child"]
    process = Process(int(moved["generation"]), int(moved["at_exit"]))
    process.pid, process.cgroup, process.alone = int(moved["pid"]), str(moved["cgroup"]), bool(moved["alone"])
    process.stuck = [str(s) for s in moved["stuck"]]
    if moved["status"] is not None:
        process.status = int(moved["status"])
        process.exited.set()
    stderr = fds.get(f"session:{sid}:stderr", -1)
    contained = moved["contained"]
    limits = None
    if contained is not None:
        limits = (Limits(int(contained["memory"]), int(contained["pids"]), float(contained["cpu"])),
                  bool(contained["accounting"]))  # fmt: skip
    child = Child.moved(process, Stdio((-1, -1, -1), stderr=stderr, socket=fd), limits, signal_in_exit, launcher)
    child.signals_sent = [str(s) for s in moved["signals_sent"]]
    relay = SocketRelay(sock, int(values["header_length"]))
    relay.inbound.reported, relay.outbound.reported, relay.rwnd.reported_blocked = values["reported"]
    spawn_seconds = values["spawn_seconds"]
    return Unpacked(str(values["service"]), visit, relay, child,
                    None if spawn_seconds is None else float(spawn_seconds))  # fmt: skip


def _plain(value: Any) -> Any:
    """A tuple as JSON keeps it (a list); anything else as it is."""
    return list(value) if isinstance(value, tuple) else value


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
