"""Run by test_session_end.py in a process of its own (a child watcher there reaps every child
of the process, which would confuse pytest's own subprocesses): one Session, admitted by a real
Gate, over a real socket and a real child, given a relay that raises where the test says.

Prints one JSON object: what the session's end hook saw, the gate's slots after, the log lines.
"""

from __future__ import annotations

import json
import os
import sys

import gevent
from gevent import socket

from gsrv.accept.gate import Gate
from gsrv.config.parse import Config, parse
from gsrv.contain.root import Root
from gsrv.edge.arrival import Arrival, Visit
from gsrv.logs import Log
from gsrv.relay.child import Child, Launcher
from gsrv.relay.pump import End, FdSource, PipeSink, move
from gsrv.relay.relays import Closing, PipeRelay
from gsrv.relay.session import Session
from gsrv.relay.watchdog import Watchdog
from gsrv.spawn.client import Spawner

CONFIG = """
[server]
kill_grace = "1s"
[services.probe]
listen = "127.0.0.1:0"
command = ["sh", "-c", "sleep 300 & exec cat > /dev/null"]
relay = "copy"
"""


class Bug(Exception):
    pass


class RaisingSource(FdSource):
    """The client's bytes, until 64 KiB have gone to the child: then a bug."""

    moved = 0

    def read(self, limit: int) -> memoryview:
        if self.moved >= 64 * 1024:
            raise Bug("mid-transfer, in a direction")
        data = super().read(limit)
        self.moved += len(data)
        return data


class RaisingRelay(PipeRelay):
    """The copy relay with a bug where `where` says: in the upload direction, in a fact the
    session reads from its own greenlet (last_activity) once bytes have moved, or in the
    close that its teardown calls."""

    def __init__(self, sock: socket.socket, chunk: int, where: str) -> None:
        super().__init__(sock, chunk)
        self.where = where

    def _in(self, child: Child) -> End:
        if self.where != "direction":
            return super()._in(child)
        return move(RaisingSource(self.sock.fileno(), self.chunk), PipeSink(child.stdin), self.inbound, self.chunk)

    def close(self, closing: Closing) -> None:
        if self.where == "close":
            raise Bug("mid-transfer, in the relay's close (the teardown itself)")
        super().close(closing)

    def last_activity(self) -> float:
        if self.where == "facts" and self.inbound.total >= 64 * 1024:
            raise Bug("mid-transfer, in a fact the session reads")
        return super().last_activity()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def main(where: str, log_path: str) -> dict[str, object]:
    config = parse("probe.toml", CONFIG)
    root = Root(config.cgroup.host) if config.cgroup.host.mode != "none" else None
    if root is not None:  # as `gsrv serve` does: sessions get their cgroups below gsrv's root
        root.create()
    spawner = Spawner(Log(2), root.spawner_homes if root is not None else ())
    spawner.start()
    seen: dict[str, object] = {}
    try:
        _probe(where, log_path, config, seen, Launcher(spawner, root))
    finally:
        spawner.close()
        if root is not None:
            seen["cgroups_left"] = root.remove()
    return seen


def _probe(where: str, log_path: str, config: Config, seen: dict[str, object], launcher: Launcher) -> None:
    svc = config.services[0]
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    log = Log(log_fd)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    sessions: list[Session] = []

    class Probe:
        """The gate's handler: every connection becomes a session with the raising relay."""

        has_prelude = False

        def arrive(self, sock: socket.socket, address: object) -> Visit:
            return Visit(Arrival(sock, address), "probe-1")

        def prelude(self, visit: Visit) -> Visit | None:
            raise AssertionError("no prelude configured")

        def start(self, visit: Visit) -> Session | int | None:
            session = Session(svc, config.server, visit, log, Watchdog(), launcher,
                              relay=RaisingRelay(visit.sock, svc.chunk_size, where), on_end=at_end)  # fmt: skip
            sessions.append(session)
            return session.start() or session

        def spawned(self, session: Session) -> int | None:
            return session.spawned()

        def run(self, session: Session) -> None:
            session.run()

        def drop(self, visit: Visit, reason: str, error: str | None = None) -> None:
            raise AssertionError(f"dropped: {reason} {error}")

    def at_end(session: Session) -> None:
        child = session.child
        assert child is not None
        seen.update(reaped=child.exited.is_set(), group_alive=group_alive(child.pid), active=gate.active)

    gate: Gate[Visit, Session] = Gate("probe", 4, log, Probe())
    client = socket.create_connection(listener.getsockname())
    accepted, address = listener.accept()
    gate.admit(accepted, address)
    seen["active_while_running"] = gate.active
    try:
        with gevent.Timeout(20, "the session did not end"):
            client.sendall(b"x" * (1024 * 1024))
            client.shutdown(socket.SHUT_WR)  # the client's EOF: the session looks at its facts again
    except OSError as e:  # the session's reset may cut the upload short
        seen["client_error"] = type(e).__name__
    with gevent.Timeout(20, "the session did not free its slot"):
        while gate.active:
            gevent.sleep(0.01)
    seen["active_after"] = gate.active
    try:
        with gevent.Timeout(5, TimeoutError):
            seen["client_saw"] = "eof" if client.recv(1) == b"" else "bytes"
    except ConnectionResetError:
        seen["client_saw"] = "reset"
    except TimeoutError:
        seen["client_saw"] = "nothing: the connection was left open"
    seen["bytes_in"] = sessions[0].meters()[0][1].total
    log.flush()
    client.close()


if __name__ == "__main__":
    assert Child  # the spawn path under test is the real one
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
