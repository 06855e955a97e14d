"""The operator's view on the admin listener: GET /sessions and /services (JSON), POST
/sessions/ID/end and /services/NAME/pause|resume|drain, and /readyz/NAME; and who may ask.

Who may ask: with `[admin] auth = { bearer = FILE }` (required off loopback) a token guards
everything here but /readyz/NAME; on a loopback listener the Host must be a loopback name (a
page whose name was made to resolve to 127.0.0.1 gets 403: DNS rebinding); a POST needs a
JSON body and an Origin that is absent or the listener's own (a cross-site form cannot send
either), and `control = false` refuses every POST (403). Each action is logged with who asked.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from gsrv.config.address import is_loopback
from gsrv.config.auth import same_token
from gsrv.config.parse import AdminConfig
from gsrv.ops.history import History

ACTIONS = ("pause", "resume", "drain")
BODY_MAX = 4096
LISTING_BATCH = 50  # GET /sessions: sessions encoded and written at a time
PAGE_SESSIONS = 500  # the status page's table: at most so many sessions (with their count)
# The status page and its files (ops/status/): no data in them, so they load without a token
# (a browser cannot send one for a page load); the page asks for one when /status.json says 401.
STATIC = {"/": ("status.html", "text/html; charset=utf-8"), "/status.js": ("status.js", "text/javascript"),
          "/status.css": ("status.css", "text/css")}  # fmt: skip
PAGE_POLICY = "default-src 'self'; frame-ancestors 'none'"  # no page of another site frames it (clickjacking)


class Operator(Protocol):
    """What the view asks of the server (gsrv/server.py)."""

    def sessions(self, service: str | None = None, waiting: str | None = None) -> Iterator[dict[str, object]]: ...
    def list_services(self) -> list[dict[str, object]]: ...
    def end_session(self, sid: str, who: dict[str, object]) -> bool: ...
    def act(self, name: str, action: str, who: dict[str, object]) -> bool: ...
    def service_readiness(self, name: str) -> str | None: ...  # KeyError: no such service


class Upgrading(Protocol):
    """What the view asks of the upgrades (gsrv/upgrade/leave.py)."""

    def ask(self, exec_path: str | None, who: dict[str, object], wait: bool = True) -> dict[str, object]: ...
    def status(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class Reply:
    status: str
    body: bytes | Iterator[bytes]  # an iterator: written as it comes, chunked (a listing of 10,000)
    kind: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def reply(status: str, fields: dict[str, object], headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, json.dumps(fields, separators=(",", ":")).encode() + b"\n", headers=headers)


class Control:
    """Routes and guards the operator's requests; `operator` is set by the composer."""

    def __init__(self, config: AdminConfig) -> None:
        self.config = config
        self.operator: Operator | None = None
        self.history: History | None = None  # the plots' samples (the composer starts its sampling)
        self.guard: Callable[[], dict[str, object]] | None = None  # the memory guard's figures now
        self.upgrades: Upgrading | None = None

    def handles(self, path: str) -> bool:
        return path in STATIC or path in ("/status.json", "/upgrade") or path.startswith(("/sessions", "/services",
                                                                                          "/readyz/"))  # fmt: skip

    def handle(self, environ: dict[str, Any]) -> Reply:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        operator = self.operator
        if operator is None:
            return reply("503 Service Unavailable", {"error": "starting"})
        if path.startswith("/readyz/"):  # open, like /readyz: a balancer reads it
            return self._readiness(operator, path.removeprefix("/readyz/"))
        if path in STATIC and method == "GET":
            name, kind = STATIC[path]
            body = resources.files("gsrv.ops").joinpath("status", name).read_bytes()
            return Reply("200 OK", body, kind, (("Content-Security-Policy", PAGE_POLICY),))
        refused = self._refused(environ, method)
        if refused is not None:
            return refused
        if method == "GET" and path == "/status.json":
            return self._status(operator)
        parts = path.strip("/").split("/")
        if method == "GET" and parts == ["sessions"]:
            query = parse_qs(environ.get("QUERY_STRING", ""))
            found = operator.sessions(_one(query, "service"), _one(query, "waiting"))
            return Reply("200 OK", _listing(found))
        if method == "GET" and parts == ["services"]:
            return reply("200 OK", {"services": operator.list_services()})
        if parts == ["upgrade"] and self.upgrades is not None:
            return self._upgrade(self.upgrades, method, environ)
        if method == "POST" and len(parts) == 3 and parts[0] == "sessions" and parts[2] == "end":
            if operator.end_session(parts[1], self._who(environ)):
                return reply("200 OK", {"ended": parts[1]})
            return reply("404 Not Found", {"error": f"no running session {parts[1]} (it ended, or never was)"})
        if method == "POST" and len(parts) == 3 and parts[0] == "services" and parts[2] in ACTIONS:
            if operator.act(parts[1], parts[2], self._who(environ)):
                return reply("200 OK", {"service": parts[1], "action": parts[2]})
            return reply("404 Not Found", {"error": f"no service {parts[1]} in the running config"})
        allowed = ("GET /sessions, GET /services, POST /sessions/ID/end, POST /services/NAME/pause|resume|drain, "
                   "GET|POST /upgrade")  # fmt: skip
        return reply("404 Not Found", {"error": f"{method} {path}: no such action (try {allowed})"})

    def _upgrade(self, upgrades: Upgrading, method: str, environ: dict[str, Any]) -> Reply:
        """GET: the last upgrade's result; POST {"exec": PATH?}: one now, answered once the new
        code's check has (202: the exec follows; 409: refused, and why)."""
        if method == "GET":
            return reply("200 OK", upgrades.status())
        exec_path = environ["gsrv.body"].get("exec")
        if exec_path is not None and not isinstance(exec_path, str):
            return reply("400 Bad Request", {"error": f'"exec" must be a path, not {exec_path!r}'})
        answer = upgrades.ask(exec_path, self._who(environ))
        if answer.get("result") == "exec":
            return reply("202 Accepted", answer)
        return reply("409 Conflict", {**answer, "error": answer.get("why")})

    def _status(self, operator: Operator) -> Reply:
        """What the status page shows, in one answer (at most PAGE_SESSIONS sessions described:
        the page asks every second)."""
        services = operator.list_services()
        return reply("200 OK", {"services": services, "guard": self.guard() if self.guard else None,
                                 "history": self.history.series() if self.history else [],
                                 "sessions": list(itertools.islice(operator.sessions(), PAGE_SESSIONS)),
                                 "count": sum(int(str(s["sessions"])) for s in services),
                                 "control": self.config.control})  # fmt: skip

    def _readiness(self, operator: Operator, name: str) -> Reply:
        try:
            why = operator.service_readiness(name)
        except KeyError:
            return Reply("404 Not Found", f"no service {name}\n".encode(), "text/plain")
        if why is None:
            return Reply("200 OK", b"ready\n", "text/plain")
        return Reply("503 Service Unavailable", f"not ready: {why}\n".encode(), "text/plain")

    def _refused(self, environ: dict[str, Any], method: str) -> Reply | None:
        """Why this request may not go on, answered; None: it may."""
        host = environ.get("HTTP_HOST", "")
        if is_loopback(self.config.listen.host) and not is_loopback(_hostname(host)):
            return reply("403 Forbidden", {"error": f"Host {json.dumps(host[:64])} is not a loopback name on a "
                                                    "loopback listener"})  # fmt: skip
        credentials = self.config.auth
        if credentials is not None:
            token = self._token(environ.get("HTTP_AUTHORIZATION", ""))
            if token is None:
                challenge = (("WWW-Authenticate", f'Bearer realm="{credentials.realm}"'),)
                return reply("401 Unauthorized", {"error": "a valid bearer token is needed"}, challenge)
            environ["gsrv.token"] = token
        if method == "GET":
            return None
        if method != "POST":
            return reply("405 Method Not Allowed", {"error": f"{method}: GET or POST"}, (("Allow", "GET, POST"),))
        if not self.config.control:
            return reply("403 Forbidden", {"error": "control = false: this admin listener is read-only"})
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and origin.lower() != f"http://{host}".lower():
            return reply("403 Forbidden", {"error": f"Origin {origin} is not this admin listener's"})
        if environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower() != "application/json":
            return reply("415 Unsupported Media Type", {"error": "a POST needs Content-Type: application/json"})
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(min(length, BODY_MAX)) or b"null")
        except (ValueError, RecursionError):  # not a length, not JSON (or not UTF-8), nested too deep
            body = None
        if not isinstance(body, dict):
            return reply("400 Bad Request", {"error": "a POST's body must be a JSON object, like {}"})
        environ["gsrv.body"] = body
        return None

    def _token(self, authorization: str) -> str | None:
        """The name of the token sent ("token-N", its line in the file), if it is one."""
        scheme, _, value = authorization.strip().partition(" ")
        credentials = self.config.auth
        if credentials is None or scheme.lower() != "bearer":
            return None
        matches = [n for n, token in enumerate(credentials.tokens, 1) if same_token(value.strip(), token)]
        return f"token-{matches[0]}" if matches else None

    @staticmethod
    def _who(environ: dict[str, Any]) -> dict[str, object]:
        return {"by": f"{environ.get('REMOTE_ADDR')}:{environ.get('REMOTE_PORT')}", "token": environ.get("gsrv.token")}


def _listing(sessions: Iterator[dict[str, object]]) -> Iterator[bytes]:
    """{"sessions": [...], "count": N} encoded LISTING_BATCH sessions at a time, each batch
    written as the walk reaches it (the walk gives the loop away between its slices)."""
    yield b'{"sessions":['
    count = 0
    for batch in _batches(sessions, LISTING_BATCH):
        yield (b"," if count else b"") + json.dumps(batch, separators=(",", ":")).encode()[1:-1]
        count += len(batch)
    yield b'],"count":%d}\n' % count


def _batches(items: Iterator[dict[str, object]], size: int) -> Iterator[list[dict[str, object]]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _hostname(host: str) -> str:
    """The name in a Host header, without its port."""
    try:
        return urlsplit("//" + host).hostname or ""
    except ValueError:
        return ""
