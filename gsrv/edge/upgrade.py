"""The WebSocket upgrade (`transport = "websocket"`): the HTTP request read with h11 under the
service's handshake_timeout, judged without I/O (`judge`: path, upgrade headers, origin),
then answered: 101 and the frames begin, or a short HTTP answer and the connection ends
(400, 403, 404, 405, or the console page) before any child starts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Protocol
from urllib.parse import unquote, urlsplit

import h11
from gevent.lock import Semaphore
from gevent.socket import socket

from gsrv.config.http import HttpConfig
from gsrv.config.web import WebSocketConfig
from gsrv.errors import GsrvError

MAX_HEAD = 16 * 1024  # the request line and headers; a longer head is a bad request
READ = 4096
DEFAULT_PORTS = {"http": 80, "https": 443}
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


class Stream(Protocol):
    """The bytes of a connection, plain or decrypted (edge/tls.py's TlsStream)."""

    closed: bool  # it sends no more (TLS: our close_notify went out)
    torn: bool  # a send stopped inside its bytes (a direction killed mid-write): no frame can follow

    def recv(self, size: int) -> bytes: ...
    def send(self, data: bytes | bytearray | memoryview) -> float: ...
    def close_notify(self) -> None: ...


class Refused(GsrvError):
    """The upgrade did not happen: `reason` for the log (bad_request, origin_denied, console)."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent: path and query
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; repeats joined by ", "

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


@dataclass(frozen=True)
class Upgraded:
    """A connection after its upgrade: the request, the bytes that came after it (frames the
    client sent at once), and the stream the frames travel on."""

    request: Request
    leftover: bytes
    stream: Stream

    def env(self, ws: WebSocketConfig, remote: tuple[str, int] | None) -> dict[str, str]:
        """The request as CGI names it, for the child; headers only when `headers` names them."""
        request = self.request
        env = {"REQUEST_METHOD": request.method, "REQUEST_URI": request.target,
               "PATH_INFO": unquote(path_info(request.path, ws.path)), "QUERY_STRING": request.query}  # fmt: skip
        if remote is not None:
            env |= {"REMOTE_ADDR": str(remote[0]), "REMOTE_PORT": str(remote[1])}
        for name in ws.headers:
            if name in request.headers:
                env["HTTP_" + name.upper().replace("-", "_")] = request.headers[name]
        return env


@dataclass(frozen=True)
class Answer:
    status: int  # 101: upgrade; else the HTTP status sent before the close
    reason: str = ""  # the session_end reason when it is not an upgrade
    error: str = ""


def judge(request: Request, ws: WebSocketConfig, secure: bool) -> Answer:
    """What to answer, from the request alone (no I/O, so tests need no socket)."""
    if not under(request.path, ws.path):
        return Answer(404, "bad_request", f"path {request.path} is not {ws.path}")
    headers = request.headers
    if "websocket" not in tokens(headers.get("upgrade", "")):
        if request.method in ("GET", "HEAD") and ws.console:
            return Answer(200, "console")
        return Answer(400, "bad_request", "not a WebSocket upgrade (no Upgrade: websocket)")
    if request.method != "GET":
        return Answer(405, "bad_request", f"a WebSocket upgrade must be a GET (got {request.method})")
    if "upgrade" not in tokens(headers.get("connection", "")):
        return Answer(400, "bad_request", "no Connection: Upgrade")
    if headers.get("sec-websocket-version") != "13":
        return Answer(400, "bad_request", f"Sec-WebSocket-Version {headers.get('sec-websocket-version')!r} is not 13")
    try:
        nonce = base64.b64decode(headers.get("sec-websocket-key", ""), validate=True)
    except binascii.Error:
        nonce = b""
    if len(nonce) != 16:
        return Answer(400, "bad_request", "no valid Sec-WebSocket-Key")
    host = headers.get("host", "")
    if not host_allowed(host, ws):
        return Answer(403, "host_denied", f"Host {host!r} is not one this service answers to (hosts)")
    origin = headers.get("origin")
    if origin is not None and not origin_allowed(origin, headers.get("host", ""), secure, ws.origins):
        return Answer(
            403, "origin_denied", f"Origin {origin} is not this host's ({headers.get('host')}) nor in origins"
        )
    return Answer(101)


def host_allowed(host: str, ws: WebSocketConfig | HttpConfig) -> bool:
    """The Host a client asked for: any, unless the service listens on loopback (or a unix
    socket), where only loopback names and `hosts` are answered: a page whose own name
    resolves to 127.0.0.1 (DNS rebinding) sends its own name as Host and its origin matches."""
    try:
        name = urlsplit("http://" + host.lower()).hostname or ""
    except ValueError:  # "[::1" and the like
        return False
    if "*" in ws.hosts or name in ws.hosts:
        return True
    if not ws.local_only:
        return not ws.hosts
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def path_info(path: str, prefix: str) -> str:
    """What follows the service's path, as a CGI script's PATH_INFO."""
    return path if prefix == "/" else path[len(prefix.rstrip("/")) :]


def tokens(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",")}


def origin_allowed(origin: str, host: str, secure: bool, allowed: tuple[str, ...]) -> bool:
    """A browser page's origin: the Host's own (same scheme, host and port), or one of `allowed`."""
    if "*" in allowed:
        return True
    try:
        return _origin_allowed(origin, host, secure, allowed)
    except ValueError:  # not a URL ("http://[::1", a bad port)
        return False


def _origin_allowed(origin: str, host: str, secure: bool, allowed: tuple[str, ...]) -> bool:
    parts = urlsplit(origin.lower())
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return False  # "null" (a file or a sandboxed frame) and other schemes
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        return False
    normal = f"{parts.scheme}://{parts.hostname}:{port}"
    if normal in {_normal(o) for o in allowed}:
        return True
    own = urlsplit(("https://" if secure else "http://") + host.lower())
    try:
        own_port = own.port or (443 if secure else 80)
    except ValueError:
        return False
    return parts.scheme == ("https" if secure else "http") and parts.hostname == own.hostname and port == own_port


def _normal(origin: str) -> str:
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or DEFAULT_PORTS.get(parts.scheme, 0)}"


def upgrade(stream: Stream, ws: WebSocketConfig, secure: bool, page: bytes) -> Upgraded:
    """Read the request and answer it; raises Refused once an answer other than 101 is sent."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        event = conn.next_event()
        while event is h11.NEED_DATA:
            data = stream.recv(READ)
            if not data:
                raise Refused("bad_request", "the connection closed before a complete HTTP request")
            conn.receive_data(data)
            event = conn.next_event()
    except h11.RemoteProtocolError as e:
        _send(stream, conn, 400, b"Bad request\n")
        raise Refused("bad_request", f"not an HTTP request: {e}") from None
    if not isinstance(event, h11.Request):
        raise Refused("bad_request", "not an HTTP request")
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    request = Request(event.method.decode("ascii", "replace"), event.target.decode("latin-1"), headers)
    answer = judge(request, ws, secure)
    if answer.status != 101:
        body = page if answer.status == 200 else f"{h11_reason(answer.status)}: {answer.error}\n".encode()
        kind = b"text/html; charset=utf-8" if answer.status == 200 else b"text/plain; charset=utf-8"
        _send(stream, conn, answer.status, b"" if request.method == "HEAD" else body, kind, len(body))
        raise Refused(answer.reason, answer.error)  # (the console page served: no error)
    accept = accept_token(headers["sec-websocket-key"])
    reply = h11.InformationalResponse(
        status_code=101, headers=[(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                                  (b"Sec-WebSocket-Accept", accept)])  # fmt: skip
    stream.send(conn.send(reply) or b"")
    return Upgraded(request, conn.trailing_data[0], stream)


def accept_token(key: str) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest())


def _send(stream: Stream, conn: h11.Connection, status: int, body: bytes, kind: bytes = b"text/plain; charset=utf-8",
          length: int | None = None) -> None:  # fmt: skip
    head = h11.Response(status_code=status, headers=[
        (b"Content-Type", kind), (b"Content-Length", str(len(body) if length is None else length).encode()),
        (b"Connection", b"close"), (b"Cache-Control", b"no-store")])  # fmt: skip
    try:
        stream.send(b"".join(part or b"" for part in (conn.send(head), conn.send(h11.Data(data=body)) if body else b"",
                                                       conn.send(h11.EndOfMessage()))))  # fmt: skip
    except h11.LocalProtocolError:  # h11 refuses to answer a request it could not parse: answer it by hand
        stream.send(f"HTTP/1.1 {status} {h11_reason(status)}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
                    f"\r\n".encode() + body)  # fmt: skip


def h11_reason(status: int) -> str:
    return {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}[status]


def console_page(ws: WebSocketConfig, typed: bool) -> bytes:
    """The page a plain browser GET gets with console = true (gsrv/edge/console.html)."""
    text = resources.files("gsrv.edge").joinpath("console.html").read_text(encoding="utf-8")
    return text.replace("__MESSAGES__", ws.messages).replace("__TYPED__", "true" if typed else "false").encode()


class PlainStream:
    """A plain connection as a Stream; whole writes under a lock, since both directions of a
    WebSocket session send frames on it (TlsStream does the same for records)."""

    def __init__(self, sock: socket) -> None:
        self.sock = sock
        self._sending = Semaphore()
        self.closed = False
        self.torn = False  # a send stopped inside its bytes: the peer holds part of a frame

    def recv(self, size: int) -> bytes:
        return bytes(self.sock.recv(size))

    def send(self, data: bytes | bytearray | memoryview) -> float:
        started = time.monotonic()
        with self._sending:
            try:
                self.sock.sendall(data)
            except BaseException:  # an error, a timeout, a kill: part of it may be out; for good
                self.torn = True
                raise
        return time.monotonic() - started

    def close_notify(self) -> None:
        """Nothing to say below the WebSocket close frame on a plain connection: it sends no more."""
        self.closed = True
