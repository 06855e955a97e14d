"""The WebSocket upgrade (`transport = "websocket"`): the HTTP request read with h11 under the
service's handshake_timeout, judged without I/O (`judge`: path, upgrade headers, origin),
then answered: 101 and the frames begin, or a short HTTP answer and the connection ends
(400, 403, 404, 405, or the console page) before any child starts.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

from gsrv.config.web import WebSocketConfig
from gsrv.edge.hello import SUBPROTOCOL
from gsrv.edge.http import HttpConnection
from gsrv.edge.httphead import DEFAULT_PORTS, HeadError, Request, judge_target, path_info, quoted, tokens, under
from gsrv.edge.httphead import host_allowed as host_allowed
from gsrv.edge.stream import Refused, Stream
from gsrv.edge.wsframes import FrameReader

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


@dataclass(frozen=True)
class Upgraded:
    """A connection after its upgrade: the request, the bytes that came after it (frames the
    client sent at once), and the stream the frames travel on."""

    request: Request
    leftover: bytes
    stream: Stream
    term: bool = False  # the terminal page's protocol (edge/hello.py) was agreed: a hello comes first
    reader: FrameReader | None = None  # after the hello: the frames reader, holding what followed it


@dataclass(frozen=True)
class Answer:
    status: int  # 101: upgrade; else the HTTP status sent before the close
    reason: str = ""  # the session_end reason when it is not an upgrade
    error: str = ""


def judge(request: Request, ws: WebSocketConfig, secure: bool) -> Answer:
    """What to answer, from the request alone (no I/O, so tests need no socket)."""
    if not under(request.path, ws.path):
        return Answer(404, "bad_request", f"path {quoted(request.path)} is not {ws.path}")
    try:
        judge_target(request, ws)
    except HeadError as e:
        return Answer(e.status, e.reason, str(e))
    header = request.header
    if "websocket" not in tokens(header("upgrade") or ""):
        if request.method in ("GET", "HEAD") and ws.console:
            return Answer(200, "console")
        return Answer(400, "bad_request", "not a WebSocket upgrade (no Upgrade: websocket)")
    if request.method != "GET":
        return Answer(405, "bad_request", f"a WebSocket upgrade must be a GET (got {quoted(request.method)})")
    if "upgrade" not in tokens(header("connection") or ""):
        return Answer(400, "bad_request", "no Connection: Upgrade")
    if header("sec-websocket-version") != "13":
        return Answer(
            400, "bad_request", f"Sec-WebSocket-Version {quoted(header('sec-websocket-version') or '')} is not 13"
        )
    try:
        nonce = base64.b64decode(header("sec-websocket-key") or "", validate=True)
    except ValueError:  # not base64 (binascii.Error), or not ASCII at all
        nonce = b""
    if len(nonce) != 16:
        return Answer(400, "bad_request", "no valid Sec-WebSocket-Key")
    host, origin = header("host") or "", header("origin")
    if origin is not None and not origin_allowed(origin, host, secure, ws.origins):
        return Answer(
            403, "origin_denied", f"Origin {quoted(origin)} is not this host's ({quoted(host)}) nor in origins"
        )
    return Answer(101)


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


Site = dict[str, tuple[bytes, str]]  # what follows the service's path -> (body, Content-Type)
# The terminal page's Content-Security-Policy: nothing loads from anywhere but gsrv. Inline
# styles are allowed (xterm.js's renderer writes its cell sizes and theme into <style> elements
# it makes); scripts, images, fonts and connections stay 'self' only.
TERMINAL = "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
TERM_FILES = {"xterm.js": "text/javascript", "addon-fit.js": "text/javascript", "term.js": "text/javascript",
              "xterm.css": "text/css", "term.css": "text/css"}  # fmt: skip


def upgrade(stream: Stream, ws: WebSocketConfig, secure: bool, site: Site,
            authorize: Callable[[HttpConnection], object] | None = None) -> Upgraded:  # fmt: skip
    """Read the request (edge/http.py: the same head reader and raw checks as transport =
    "http") and answer it; raises Refused once an answer other than 101 is sent."""
    conn = HttpConnection(stream, secure)
    request = conn.read_head()
    answer = judge(request, ws, secure)
    if answer.status != 101:
        if answer.status != 200:
            conn.refuse(answer.status, answer.reason, answer.error)
        body, kind = site.get(path_info(request.path, ws.path).rstrip("/"), site[""])
        conn.send_page(body, kind, TERMINAL if "/_term/xterm.js" in site else None)
        raise Refused(answer.reason, answer.error)  # (the console page served: no error)
    if authorize is not None:
        authorize(conn)  # raises Refused once it answered 401 or 429
    accept = accept_token(request.header("sec-websocket-key") or "").decode()
    term = speaks_term(ws, request.header("sec-websocket-protocol") or "")
    protocol = f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n" if term else ""
    stream.send(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n{protocol}\r\n".encode())  # fmt: skip
    return Upgraded(request, conn.buffered, stream, term)


def speaks_term(ws: WebSocketConfig, protocols: str) -> bool:
    """The terminal page's protocol: asked for (Sec-WebSocket-Protocol), on a pty service."""
    return ws.pty and SUBPROTOCOL in tokens(protocols)


def accept_token(key: str) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest())


def console_site(ws: WebSocketConfig, typed: bool, pty: bool) -> Site:
    """What a plain browser GET gets with console = true: with a pty a terminal (xterm.js, its
    files at PATH/_term/NAME, all of them gsrv's: gsrv/edge/term/), else a page that sends
    lines and shows what comes back (gsrv/edge/console.html)."""
    files = resources.files("gsrv.edge")
    if not pty:
        text = files.joinpath("console.html").read_text(encoding="utf-8")
        page = text.replace("__MESSAGES__", ws.messages).replace("__TYPED__", "true" if typed else "false")
        return {"": (page.encode(), "text/html; charset=utf-8")}
    term = files.joinpath("term")
    site = {"": (term.joinpath("terminal.html").read_bytes(), "text/html; charset=utf-8")}
    for name, kind in TERM_FILES.items():
        site[f"/_term/{name}"] = (term.joinpath(name).read_bytes(), f"{kind}; charset=utf-8")
    return site
