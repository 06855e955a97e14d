"""An accepted connection (`Arrival`: the socket and its peer), what its prelude found, made once
and frozen (`Prelude`: the PROXY header, TLS, the upgrade or the HTTP connection, the hello, the
user), and one way of it to a session (`Visit`: its id, its start, its prelude), with the
child's environment built from all that.
"""

from __future__ import annotations

import socket as stdsocket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gevent.socket import socket

from gsrv.config.address import host_port
from gsrv.config.parse import ServiceConfig
from gsrv.edge.hello import Hello
from gsrv.edge.http import HttpConnection
from gsrv.edge.httphead import Gateway, cgi_env
from gsrv.edge.proxy import ProxyHeader
from gsrv.edge.tls import TlsStream
from gsrv.edge.upgrade import Upgraded


def address_text(addr: tuple[str, int]) -> str:
    return host_port(str(addr[0]), int(addr[1]))


def peer_credentials(sock: socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a unix-socket client (SO_PEERCRED)."""
    try:
        raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def build_env(svc: ServiceConfig, extra: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: the allowlist from gsrv's own and the service's table (read at
    load: gsrv never changes its environment), then UCSPI and what the transport carried."""
    result = dict(svc.base_env)
    result.update(extra)
    return result


class Arrival:
    """An accepted connection: the socket and who is at its other end, as accept() reported it.
    Lives as long as the connection (an HTTP connection's requests share it); `at_end` hooks run
    once it has ended."""

    def __init__(self, sock: socket, peer: Any) -> None:
        self.sock = sock
        self.spawn_error: str | None = None  # why its command could not start yet (out of fds or memory)
        self._at_end: list[Callable[[], None]] = []
        self.tcp = sock.family in (stdsocket.AF_INET, stdsocket.AF_INET6)
        self.peer = peer  # as accept() reported it: a client that reset since has no peer name
        self.creds = None if self.tcp else peer_credentials(sock)  # a unix client's (pid, uid, gid)
        if self.tcp:
            self.peer_text = address_text(peer)
        else:
            self.peer_text = f"unix:pid={self.creds[0]},uid={self.creds[1]}" if self.creds else "unix"

    def at_end(self, hook: Callable[[], None]) -> None:
        """Call hook once the connection has ended (after its log line), however it ends."""
        self._at_end.append(hook)

    def ended(self) -> None:
        hooks, self._at_end = self._at_end, []
        for hook in hooks:
            hook()

    @property
    def peer_ip(self) -> str | None:
        return str(self.peer[0]) if self.tcp else None


@dataclass(frozen=True, eq=False)  # one connection's: equal to itself only
class Prelude:
    """What a connection's prelude found, made once (edge/door.py): a trusted proxy's header and
    the client it names, TLS, the WebSocket upgrade and the terminal page's hello, the HTTP
    connection (its request is the one just read), the user auth let in."""

    header: ProxyHeader | None = None
    client: tuple[str, int] | None = None  # the header's client; None: the peer is the client
    tls: TlsStream | None = None
    websocket: Upgraded | None = None
    hello: Hello | None = None
    http: HttpConnection | None = None  # transport = "http": the connection across its requests
    user: tuple[str, str] | None = None  # (REMOTE_USER, AUTH_TYPE)


NOTHING_YET = Prelude()


@dataclass(frozen=True, eq=False)  # hashed by identity: keep-alive keys its watchers by it
class Visit:
    """One connection's way to a session (an HTTP connection: each of its requests): its socket
    and peer, the session id that names it in every log line (a session or a refusal), when it
    began, and what its prelude found."""

    arrival: Arrival
    sid: str
    started: float = field(default_factory=time.monotonic)
    prelude: Prelude = NOTHING_YET
    connection_sid: str = ""  # an HTTP connection's first request's: its next requests name it (conn=)

    @property
    def sock(self) -> socket:
        return self.arrival.sock

    def next_request(self, sid: str) -> Visit:
        """A kept-alive connection's next request: a session id and a start of its own, the
        connection's prelude (header, TLS, the HTTP connection) kept until its head is read."""
        self.arrival.spawn_error = None  # the last request's: this one has none yet
        return replace(self, sid=sid, started=time.monotonic(), connection_sid=self.connection_sid or self.sid)

    def age(self) -> float:
        """Seconds since accept (since the request began, for a kept-alive connection's next)."""
        return time.monotonic() - self.started

    @property
    def client(self) -> tuple[str, int] | None:
        """Who the client is: the one a trusted PROXY header names, else the TCP peer (a LOCAL or
        UNKNOWN header names none)."""
        if self.prelude.client is not None:
            return self.prelude.client
        return self.arrival.peer if self.arrival.tcp else None

    @property
    def client_ip(self) -> str | None:
        client = self.client
        return str(client[0]) if client else None

    def peer_line(self) -> bytes:
        """A PROXY v1 line for the child (`peer_line = "proxy-v1"`): the client (as a trusted
        proxy reported it, else the peer) and the address it connected to; UNKNOWN when there
        is no client address (a unix socket, a LOCAL header)."""
        local = self.sock.getsockname()
        client, tcp = self.client, self.arrival.tcp
        if client is None or not tcp and self.prelude.header is None:
            return b"PROXY UNKNOWN\r\n"
        family = "TCP6" if ":" in str(client[0]) else "TCP4"
        if not tcp or (":" in str(local[0])) != (family == "TCP6"):
            local = ("::" if family == "TCP6" else "0.0.0.0", 0)  # the local address of another family: none
        return f"PROXY {family} {client[0]} {local[0]} {client[1]} {local[1]}\r\n".encode()

    def log_fields(self) -> dict[str, object]:
        arrival, prelude = self.arrival, self.prelude
        fields: dict[str, object] = {"peer": arrival.peer_text}
        if prelude.header is not None and prelude.client is not None and prelude.client != arrival.peer:
            fields = {"peer": address_text(prelude.client), "proxy": arrival.peer_text}
        if prelude.tls is not None:
            fields["tls"] = prelude.tls.version
        if self.connection_sid and self.sid != self.connection_sid:
            fields["conn"] = self.connection_sid
        if prelude.user is not None:
            fields["user"] = prelude.user[0]
        return fields

    def env(self, svc: ServiceConfig) -> dict[str, str]:
        """The child's environment: the allowlist, the service's env, then UCSPI, TLS and the
        request (CGI's names) the transport carried."""
        arrival, prelude = self.arrival, self.prelude
        local = self.sock.getsockname()
        extra = {"GSRV_SERVICE": svc.name, "GSRV_SESSION": self.sid}
        if arrival.tcp:
            client = self.client or arrival.peer
            extra |= {"PROTO": "TCP", "TCPREMOTEIP": str(client[0]), "TCPREMOTEPORT": str(client[1]),
                      "TCPLOCALIP": str(local[0]), "TCPLOCALPORT": str(local[1])}  # fmt: skip
        else:  # as ucspi-unix's unixserver sets them
            extra |= {"PROTO": "UNIX", "UNIXLOCALPATH": str(local)}
            if arrival.creds:
                extra |= {"UNIXREMOTEPID": str(arrival.creds[0]), "UNIXREMOTEEUID": str(arrival.creds[1]),
                          "UNIXREMOTEEGID": str(arrival.creds[2])}  # fmt: skip
            if self.client is not None:
                extra |= {"TCPREMOTEIP": str(self.client[0]), "TCPREMOTEPORT": str(self.client[1])}
        if prelude.tls is not None:
            extra |= prelude.tls.env()
        remote = self.client
        ws, http = svc.interact.websocket, svc.interact.http
        if prelude.websocket is not None and ws is not None:
            extra |= cgi_env(prelude.websocket.request, ws.path, remote, headers=ws.headers)
        request = prelude.http.request if prelude.http is not None else None
        if http is not None and request is not None:
            gateway = Gateway(local if arrival.tcp else None, prelude.tls is not None)
            extra |= cgi_env(request, http.path, remote, gateway)
        if prelude.user is not None:
            extra |= {"REMOTE_USER": prelude.user[0], "AUTH_TYPE": prelude.user[1]}
        return build_env(svc, extra)
