"""An HTTP request head (`transport = "http"`), without I/O: where it ends, what gsrv refuses on
the raw bytes before h11 sees them (request smuggling's forms h11 accepts), the parse, the
judgement against the service's `http` table, and the request as a CGI/1.1 environment.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote_to_bytes, urlsplit

import h11

from gsrv.config.address import valid_host
from gsrv.config.http import HttpConfig
from gsrv.config.web import WebSocketConfig
from gsrv.errors import GsrvError

MAX_HEAD = 16 * 1024  # the request line and headers, counted by gsrv: more is 431
MAX_TARGET = 8 * 1024  # the request target: more is 414
DEFAULT_PORTS = {"http": 80, "https": 443}
PASSABLE = re.compile(r"^[A-Za-z0-9-]+$")  # a field name that maps to one HTTP_* name only
# Never in the child's environment: hop-by-hop fields, the body's framing (CONTENT_LENGTH says
# it), Proxy (HTTP_PROXY would steer the child's own HTTP clients: httpoxy, CVE-2016-5385),
# Authorization (RFC 3875 §4.1.18: the server's business).
NOT_PASSED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "expect", "proxy", "authorization", "proxy-authorization", "content-type",
                        "content-length"})  # fmt: skip


def status_text(status: int) -> str:
    """A status's reason phrase (RFC 9110's, as Python's http.HTTPStatus holds them)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


QUOTED_MAX = 64  # a client's value quoted in gsrv's answer or log: at most so many characters
CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but HTAB (RFC 9110 §5.5)


def quoted(value: str | bytes) -> str:
    """A client's value as gsrv's answers and errors quote it: printable ASCII only (anything
    else escaped as \\xNN or \\uNNNN), cut to QUOTED_MAX characters (never inside an escape);
    never a Python repr."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    pieces: list[str] = []
    length = 0
    for c in text:
        piece = c if " " <= c <= "~" and c != "\\" else c.encode("unicode_escape").decode()
        if length + len(piece) > QUOTED_MAX:
            return '"' + "".join(pieces) + '..."'
        pieces.append(piece)
        length += len(piece)
    return '"' + "".join(pieces) + '"'


class HeadError(GsrvError):
    """A request gsrv answers itself, before any child: the status, the log's reason, why."""

    def __init__(self, status: int, reason: str, error: str) -> None:
        super().__init__(error)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent
    version: str  # "1.0" | "1.1"
    fields: tuple[tuple[str, str], ...]  # lower-case names, in order
    path: str  # the target's path, still %-encoded
    query: str

    def header(self, name: str) -> str | None:
        """A field's value, repeats joined by ", " (None: absent)."""
        values = [value for key, value in self.fields if key == name]
        return ", ".join(values) if values else None

    @property
    def content_length(self) -> int | None:
        value = self.header("content-length")
        return int(value) if value is not None else None

    @property
    def chunked(self) -> bool:
        return self.header("transfer-encoding") is not None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def wants_close(self) -> bool:
        """HTTP/1.0 (keep-alive not supported there) or Connection: close."""
        return self.version != "1.1" or "close" in tokens(self.header("connection") or "")

    @property
    def expects_continue(self) -> bool:
        return self.version == "1.1" and "100-continue" in tokens(self.header("expect") or "")

    @property
    def takes_trailers(self) -> bool:
        return "trailers" in tokens(self.header("te") or "")


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


def head_end(buffer: bytes | bytearray) -> int:
    """Where the head in buffer ends (after its empty line), or 0 when it is not complete
    yet. Raises HeadError: a bare CR or LF (h11 takes a bare LF), a head over MAX_HEAD."""
    end = buffer.find(b"\r\n\r\n")
    region = bytes(buffer[: end + 4] if end >= 0 else buffer[: MAX_HEAD + 4])
    bare = region.replace(b"\r\n", b"")
    if b"\n" in bare or b"\r" in bare[:-1] or (end >= 0 and b"\r" in bare):
        raise HeadError(400, "smuggling", "a bare CR or LF in the request head")
    if end < 0 and len(buffer) <= MAX_HEAD:
        return 0
    if end < 0 or end + 4 > MAX_HEAD:
        raise HeadError(431, "head_too_large", f"the request head is over {MAX_HEAD // 1024} KiB")
    return end + 4


def screen(head: bytes) -> None:
    """What gsrv refuses on the raw head (h11 would accept each): obs-fold, a repeated
    Content-Length, Content-Length with Transfer-Encoding, a coding other than chunked, a
    target over MAX_TARGET."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) == 3 and len(parts[1]) > MAX_TARGET:
        raise HeadError(414, "uri_too_long", f"the request target is over {MAX_TARGET // 1024} KiB")
    if CTL.search(lines[0]) or b"\t" in lines[0]:
        raise HeadError(400, "bad_request", "a control character in the request line")
    lengths = codings = 0
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HeadError(400, "smuggling", "a folded header line (obs-fold)")
        if CTL.search(line):
            raise HeadError(
                400, "bad_request", f"a control character in header field {quoted(line.partition(b':')[0])}"
            )
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"content-length":
            lengths += 1
        elif name == b"transfer-encoding":
            codings += 1
            if value.strip().lower() != b"chunked":
                raise HeadError(501, "not_implemented", f"Transfer-Encoding {quoted(value.strip())}: "
                                "only chunked is supported")  # fmt: skip
    if lengths > 1 or codings > 1:
        raise HeadError(400, "smuggling", "a repeated Content-Length or Transfer-Encoding")
    if lengths and codings:
        raise HeadError(400, "smuggling", "both Content-Length and Transfer-Encoding")


def parse(head: bytes) -> Request:
    """The request, parsed by h11 once gsrv's own checks passed (its body is not h11's:
    relay/http/body.py reads it)."""
    screen(head)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD + 1)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as e:
        raise HeadError(400, "bad_request", f"not an HTTP/1.1 request: {_h11_error(e)}") from None
    if not isinstance(event, h11.Request):
        raise HeadError(400, "bad_request", "not an HTTP request")
    major, _, minor = event.http_version.decode("ascii").partition(".")
    if major != "1":  # RFC 9110 §15.6.6 (the HTTP/2 preface, "PRI * HTTP/2.0", included)
        raise HeadError(505, "version_not_supported", f"HTTP/{major}.{minor}: gsrv speaks HTTP/1.1")
    version = "1.0" if minor == "0" else "1.1"  # 1.2-1.9 is served as 1.1 (RFC 9110 §2.5)
    if version == "1.1" and not any(name.lower() == b"host" for name, _ in event.headers):
        raise HeadError(400, "bad_request", "no Host: HTTP/1.1 requires one")  # (h11 asks it of 1.1 alone)
    target = event.target.decode("latin-1")
    if target.startswith("/"):
        path, _, query = target.partition("?")
        path = path.partition("#")[0]
    elif target.startswith(("http://", "https://")):  # absolute-form
        parts = urlsplit(target)
        path, query = parts.path or "/", parts.query
    else:  # "*" (OPTIONS) or an authority: nothing this server serves
        path, query = target, ""
    fields = tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers)
    return Request(event.method.decode("ascii"), target, version, fields, path, query)


def judge(request: Request, cfg: HttpConfig) -> None:
    """Raises HeadError for a request no child runs for: CONNECT and methods not listed (405),
    a path outside `path` (404) or with %00 or a dot-segment (400), a Host a loopback listener
    does not answer (403), a Content-Length over max_body (413)."""
    if request.method == "CONNECT" or "*" not in cfg.methods and request.method not in cfg.methods:
        raise HeadError(405, "method_not_allowed", f"method {quoted(request.method)} is not run here")
    if not request.path.startswith("/") or not under(request.path, cfg.path):
        raise HeadError(404, "not_found", f"path {quoted(request.path)} is not under {cfg.path}")
    judge_target(request, cfg)
    length = request.content_length
    if cfg.max_body and length is not None and length > cfg.max_body:
        raise HeadError(413, "body_too_large", f"Content-Length {length} is over max_body ({cfg.max_body})")


def judge_target(request: Request, cfg: WebSocketConfig | HttpConfig) -> None:
    """What both transports refuse in a request's path and Host: %00 or a dot-segment in the
    path (400), a Host that is not one (400), one a loopback listener does not answer (403)."""
    decoded = unquote_to_bytes(request.path)
    if b"\0" in decoded or any(segment in (b".", b"..") for segment in decoded.split(b"/")):
        raise HeadError(400, "bad_request", "a %00 or a dot-segment in the path")
    hosts = [value for name, value in request.fields if name == "host"]
    if len(hosts) > 1 or not valid_host(hosts[0] if hosts else ""):
        raise HeadError(400, "bad_request", f"Host {quoted(', '.join(hosts))} is not a host and port")
    host = hosts[0] if hosts else ""
    if not host_allowed(host, cfg):
        raise HeadError(403, "host_denied", f"Host {quoted(host)} is not one this service answers to (hosts)")


def _h11_error(e: h11.RemoteProtocolError) -> str:
    """h11's words for a malformed head, without the raw bytes it quotes as a Python repr."""
    text = str(e)
    cut = min((i for i in (text.find("bytearray("), text.find(" b'"), text.find(' b"')) if i >= 0), default=-1)
    return quoted(text[:cut].rstrip(" :") if cut >= 0 else text)


@dataclass(frozen=True)
class Gateway:
    """The HTTP front's side of RFC 3875: the address the request came to, and whether by TLS."""

    local: tuple[str, int] | None
    secure: bool


def cgi_env(request: Request, prefix: str, remote: tuple[str, int] | None, gateway: Gateway | None = None,
            headers: tuple[str, ...] = ()) -> dict[str, str]:  # fmt: skip
    """A request as RFC 3875 names it for a child, one builder for both transports that carry
    one. With `gateway` (the HTTP front): the server's variables, SCRIPT_NAME (`prefix`), the
    body's, HTTPS, every field a child may see, PATH_INFO as the bytes sent (surrogateescape).
    Without (the WebSocket upgrade): the request's own names, only the fields `headers` names,
    PATH_INFO as the bytes sent (surrogateescape) on both. REQUEST_URI and REMOTE_PORT are extensions."""
    decoded = unquote_to_bytes(path_info(request.path, prefix))
    env = {"REQUEST_METHOD": request.method, "REQUEST_URI": request.target, "QUERY_STRING": request.query,
           "PATH_INFO": decoded.decode("utf-8", "surrogateescape")}  # fmt: skip
    if remote is not None:
        env |= {"REMOTE_ADDR": str(remote[0]), "REMOTE_PORT": str(remote[1])}
    if gateway is None:
        for name in headers:
            value = request.header(name)
            if value is not None:
                env["HTTP_" + name.upper().replace("-", "_")] = value
        return env
    local = gateway.local
    host = request.header("host") or ""
    env |= {
        "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PROTOCOL": f"HTTP/{request.version}", "SERVER_SOFTWARE": "gsrv",
        "SERVER_NAME": urlsplit("//" + host).hostname or (str(local[0]) if local else ""),
        "SERVER_PORT": str(local[1]) if local else "", "SCRIPT_NAME": "" if prefix == "/" else prefix.rstrip("/"),
    }  # fmt: skip
    if request.content_length is not None:
        env["CONTENT_LENGTH"] = str(request.content_length)
    kind = request.header("content-type")
    if kind is not None:
        env["CONTENT_TYPE"] = kind
    if gateway.secure:
        env["HTTPS"] = "on"
    for field, value in request.fields:
        if field in NOT_PASSED or not PASSABLE.match(field):
            continue
        meta = "HTTP_" + field.upper().replace("-", "_")
        env[meta] = f"{env[meta]}, {value}" if meta in env else value
    return env


def short_response(status: int, text: str, version: str = "1.1", head_only: bool = False,
           fields: tuple[tuple[str, str], ...] = ()) -> bytes:  # fmt: skip
    """A short response of gsrv's own, ending its connection (Connection: close)."""
    body = f"{status_text(status)}: {text}\n".encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in fields)
    head = (
        f"HTTP/{version} {status} {status_text(status)}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n{extra}"
        "Connection: close\r\nCache-Control: no-store\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else body)
