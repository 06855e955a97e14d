"""Listening sockets for each kind of address: bound by gsrv (TCP, unix) or inherited
(fd:N from a supervisor, systemd:NAME from socket activation); and the accept loop on one,
which answers to its gate (`Listener`)."""

from __future__ import annotations

import contextlib
import os
import socket as stdsocket
import stat
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gevent import socket as gsocket
from gevent.server import StreamServer

from gsrv.config.address import Address
from gsrv.errors import GsrvError

if TYPE_CHECKING:
    from gsrv.accept.gate import Gate

SD_LISTEN_FDS_START = 3


class BindError(GsrvError):
    """A service's address could not be bound or inherited."""


def open_listener(what: str, address: Address, backlog: int, mode: int, environ: Mapping[str, str]) -> gsocket.socket:
    """A listening, non-blocking gevent socket for the address; raises BindError naming `what`
    ("service echo") and the address."""
    try:
        if address.kind == "tcp":
            return _bind_tcp(address, backlog)
        if address.kind == "unix":
            return _bind_unix(address.path, backlog, mode)
        fd = address.fd if address.kind == "fd" else systemd_fd(address.name, environ)
        return _inherit(fd)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BindError(f"{what}: cannot listen on {address}: {reason}") from None


def tune(sock: gsocket.socket, keepalive: float) -> None:
    """TCP_NODELAY and keepalive on a TCP listener: Linux copies them to every socket it
    accepts, which saves each session five setsockopt calls. Applied again on reload."""
    if sock.family not in (stdsocket.AF_INET, stdsocket.AF_INET6):
        return
    sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_KEEPALIVE, 1 if keepalive > 0 else 0)
    if keepalive > 0:
        idle = max(1, int(keepalive))
        sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_KEEPIDLE, idle)
        sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_KEEPINTVL, max(1, min(idle, 10)))
        sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_KEEPCNT, 3)


def _bind_tcp(address: Address, backlog: int) -> gsocket.socket:
    family = stdsocket.AF_INET6 if address.is_v6 else stdsocket.AF_INET
    sock = gsocket.socket(family, stdsocket.SOCK_STREAM)
    try:
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_unix(path: str, backlog: int, mode: int) -> gsocket.socket:
    _remove_stale(path)
    sock = gsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on any more; refuse to touch anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ValueError("the path exists and is not a socket")
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # a socket file left by a process that is gone
        return
    finally:
        probe.close()
    raise ValueError("another process is listening on it")


def _inherit(fd: int) -> gsocket.socket:
    try:
        os.fstat(fd)
    except OSError:
        raise ValueError(f"fd {fd} is not open (nothing was passed on it)") from None
    sock = gsocket.socket(fileno=fd)
    if sock.type != stdsocket.SOCK_STREAM or not sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ACCEPTCONN):
        sock.detach()
        raise ValueError(f"fd {fd} is not a listening stream socket")
    return sock


def take_listener(what: str, fd: int) -> gsocket.socket:
    """A listening socket an upgrade's previous code held (its fd inherited across the exec);
    raises BindError naming `what`."""
    try:
        sock = _inherit(fd)
    except (OSError, ValueError) as e:
        raise BindError(f"{what}: cannot take over its listener (fd {fd}) from the previous code: {e}") from None
    os.set_inheritable(fd, False)  # until the next upgrade makes it inheritable on purpose
    return sock


def systemd_fd(name: str, environ: Mapping[str, str]) -> int:
    """The fd systemd passed under NAME (LISTEN_FDNAMES), for this process (LISTEN_PID)."""
    if environ.get("LISTEN_PID") != str(os.getpid()) or not environ.get("LISTEN_FDS", "").isdigit():
        raise ValueError("no sockets were passed to this process (LISTEN_PID/LISTEN_FDS unset or for another pid)")
    count = int(environ["LISTEN_FDS"])
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    if name in names[:count]:
        return SD_LISTEN_FDS_START + names.index(name)
    raise ValueError(f"systemd passed no socket named {name} (LISTEN_FDNAMES={':'.join(names) or 'unset'})")


def close_listener(sock: gsocket.socket, address: Address) -> None:
    """Close a socket gsrv bound (and remove its unix socket file); leave an inherited one open."""
    if address.inherited:
        return
    sock.close()
    if address.kind == "unix":
        with contextlib.suppress(OSError):
            os.unlink(address.path)


class Listener(StreamServer):  # type: ignore[misc]
    """A StreamServer whose accept loop answers to a Gate."""

    def __init__(self, sock: Any, gate: Gate[Any, Any]) -> None:
        super().__init__(sock, gate.admit)  # gevent requires a handle; do_handle below is what runs
        self.gate = gate
        self.full = gate.full  # gevent consults this before each accept()

    def start_accepting(self) -> None:
        """gevent calls this itself too (start(), its retry timer): the gate has the last word."""
        if not self.gate.full():
            super().start_accepting()

    def do_read(self) -> Any:
        try:
            return super().do_read()
        except OSError as e:
            self.gate.accept_failed(e)
            return None

    def do_handle(self, sock: Any, address: Any) -> None:
        """In the accept loop itself: gevent's own would spawn a greenlet per connection and
        close the socket when the handle returns (the gate starts the sessions it admits)."""
        self.gate.admit(sock, address)
