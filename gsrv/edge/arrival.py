"""One accepted connection as its session sees it: the socket, who is at the other end (the
TCP peer, or the client a trusted PROXY header names), TLS if any, and the child's
environment built from all that.
"""

from __future__ import annotations

import os
import socket as stdsocket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
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


def build_env(
    environ: Mapping[str, str], pass_env: Iterable[str], env: Iterable[tuple[str, str]], extra: Mapping[str, str]
) -> dict[str, str]:
    """The child's environment: the allowlist from gsrv's own, then the service's table, then UCSPI."""
    result = {name: environ[name] for name in pass_env if name in environ}
    result.update(env)
    result.update(extra)
    return result


class Arrival:
    """An accepted connection on its way to a session: `sid` names it in every log line,
    whether it becomes a session or is refused first."""

    def __init__(self, sock: socket, peer: Any, sid: str = "") -> None:
        self.sock = sock
        self.sid = sid
        self.started = time.monotonic()
        self.spawn_error: str | None = None  # why its command could not start yet (out of fds or memory)
        self._at_end: list[Callable[[], None]] = []
        self.tcp = sock.family in (stdsocket.AF_INET, stdsocket.AF_INET6)
        self.peer = peer  # as accept() reported it: a client that reset since has no peer name
        self.creds = None if self.tcp else peer_credentials(sock)  # a unix client's (pid, uid, gid)
        if self.tcp:
            self.peer_text = address_text(peer)
        else:
            self.peer_text = f"unix:pid={self.creds[0]},uid={self.creds[1]}" if self.creds else "unix"
        self.client: tuple[str, int] | None = peer if self.tcp else None  # PROXY may replace it
        self.header: ProxyHeader | None = None
        self.tls: TlsStream | None = None
        self.websocket: Upgraded | None = None  # after its WebSocket upgrade
        self.http: HttpConnection | None = None  # transport = "http": the connection across its requests
        self.connection_sid = sid  # the first request's: each next request on it gets a sid of its own
        self.user: tuple[str, str] | None = None  # (REMOTE_USER, AUTH_TYPE) once auth let it in
        self.hello: Hello | None = None  # the terminal page's first message (edge/hello.py)

    def next_request(self, sid: str) -> None:
        """A kept-alive connection's next request: a session id and a start of its own."""
        self.sid, self.started, self.spawn_error = sid, time.monotonic(), None

    def age(self) -> float:
        """Seconds since accept."""
        return time.monotonic() - self.started

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

    @property
    def client_ip(self) -> str | None:
        return str(self.client[0]) if self.client else None

    def proxied(self, header: ProxyHeader) -> None:
        """A trusted proxy's header: the client it names (a LOCAL or UNKNOWN one names none)."""
        self.header = header
        if not header.local and isinstance(header.source, tuple):
            self.client = header.source

    def peer_line(self) -> bytes:
        """A PROXY v1 line for the child (`peer_line = "proxy-v1"`): the client (as a trusted
        proxy reported it, else the peer) and the address it connected to; UNKNOWN when there
        is no client address (a unix socket, a LOCAL header)."""
        local = self.sock.getsockname()
        client = self.client
        if client is None or not self.tcp and self.header is None:
            return b"PROXY UNKNOWN\r\n"
        family = "TCP6" if ":" in str(client[0]) else "TCP4"
        if not self.tcp or (":" in str(local[0])) != (family == "TCP6"):
            local = ("::" if family == "TCP6" else "0.0.0.0", 0)  # the local address of another family: none
        return f"PROXY {family} {client[0]} {local[0]} {client[1]} {local[1]}\r\n".encode()

    def log_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"peer": self.peer_text}
        if self.header is not None and self.client is not None and self.client != self.peer:
            fields = {"peer": address_text(self.client), "proxy": self.peer_text}
        if self.tls is not None:
            fields["tls"] = self.tls.version
        if self.http is not None and self.sid != self.connection_sid:
            fields["conn"] = self.connection_sid
        if self.user is not None:
            fields["user"] = self.user[0]
        return fields

    def env(self, svc: ServiceConfig, sid: str) -> dict[str, str]:
        """The child's environment: the allowlist, the service's env, then UCSPI, TLS and the
        WebSocket request (CGI's names)."""
        local = self.sock.getsockname()
        extra = {"GSRV_SERVICE": svc.name, "GSRV_SESSION": sid}
        if self.tcp:
            client = self.client or self.peer
            extra |= {"PROTO": "TCP", "TCPREMOTEIP": str(client[0]), "TCPREMOTEPORT": str(client[1]),
                      "TCPLOCALIP": str(local[0]), "TCPLOCALPORT": str(local[1])}  # fmt: skip
        else:  # as ucspi-unix's unixserver sets them
            extra |= {"PROTO": "UNIX", "UNIXLOCALPATH": str(local)}
            if self.creds:
                extra |= {"UNIXREMOTEPID": str(self.creds[0]), "UNIXREMOTEEUID": str(self.creds[1]),
                          "UNIXREMOTEEGID": str(self.creds[2])}  # fmt: skip
            if self.client is not None:
                extra |= {"TCPREMOTEIP": str(self.client[0]), "TCPREMOTEPORT": str(self.client[1])}
        if self.tls is not None:
            extra |= self.tls.env()
        remote = self.client or (self.peer if self.tcp else None)
        ws, http = svc.interact.websocket, svc.interact.http
        if self.websocket is not None and ws is not None:
            extra |= cgi_env(self.websocket.request, ws.path, remote, headers=ws.headers)
        request = self.http.request if self.http is not None else None
        if http is not None and request is not None:
            extra |= cgi_env(request, http.path, remote, Gateway(local if self.tcp else None, self.tls is not None))
        if self.user is not None:
            extra |= {"REMOTE_USER": self.user[0], "AUTH_TYPE": self.user[1]}
        return build_env(os.environ, svc.pass_env, svc.env, extra)
