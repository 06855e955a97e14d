"""The keys of a service that shape how its client and its command talk: a pseudo-terminal
for interactive programs (`pty`), WebSocket clients (`transport`, the `websocket` table),
children started ahead (`prespawn`) and the client's address on their stdin (`peer_line`),
and what follows from them for the other keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from gsrv.config import keys
from gsrv.config.address import is_loopback
from gsrv.config.auth import Credentials, parse_auth
from gsrv.config.http import HttpConfig, parse_http
from gsrv.config.keys import key
from gsrv.config.policy import Policy, util_linux
from gsrv.config.table import Table
from gsrv.config.units import describe
from gsrv.config.web import WebSocketConfig, parse_websocket

TERM = "xterm-256color"  # the child's TERM on a pty unless the service's env sets one
PRESPAWN_MAX = 1024


def _record_dir(t: Table, name: str, default: object) -> str | None:
    value = t.data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not os.path.isabs(value) or not os.path.isdir(value):
        raise t.fail(name, f"must be an existing directory, as an absolute path (got {describe(value)})")
    return value


@dataclass(frozen=True)
class Interaction:
    """Keys of a [services.NAME] table, like Policy's and Containment's."""

    pty: bool = key(keys.flag(), False, "the child's stdin, stdout and stderr are a new pseudo-terminal, its "
                    "controlling terminal (TERM from env, default xterm-256color; stderr defaults to \"stdout\": "
                    "the terminal)", shown=True)  # fmt: skip
    transport: str = key(keys.choice("tcp", "websocket", "http"), "tcp", '"tcp": the bytes as they come | '
                         '"websocket": an HTTP upgrade, then messages (after PROXY and TLS: wss:// with tls) | '
                         '"http": a child per HTTP request, CGI/1.1 (https:// with tls)', shown=True)  # fmt: skip
    websocket: WebSocketConfig | None = key(lambda t, name, default: None, None, "with transport = \"websocket\": "
                                            "{ path, messages, origins, max_message, ping_interval, ping_timeout, "
                                            "handshake_timeout, headers, console }, each documented in its own table",
                                            example={"path": "/", "messages": "text"}, value=None,
                                            show=lambda ws: _show(ws))  # fmt: skip
    http: HttpConfig | None = key(lambda t, name, default: None, None, 'with transport = "http": { path, methods, '
                                  "output, content_type, max_body, handshake_timeout, between_requests, "
                                  "max_requests, hosts }, each documented in its own table",
                                  example={"path": "/", "output": "cgi"}, value=None,
                                  show=lambda http: _show(http))  # fmt: skip
    prespawn: int = key(keys.integer(0), 0, "children started ahead, each waiting on its stdin for one session "
                        "(pipe relays only; such a child has no client address in its environment: see "
                        "peer_line)", reload="a changed launch retires the waiting children; a new count trims "
                        "or fills", shown=True)  # fmt: skip
    peer_line: str = key(keys.choice("none", "proxy-v1"), "none", '"proxy-v1": the first line the child reads '
                         "is a PROXY v1 line with the client's address (not counted in bytes_in)",
                         shown=True)  # fmt: skip
    auth: Credentials | None = key(parse_auth, None, 'HTTP and WebSocket: { basic = "/etc/gsrv/htpasswd" } '
                                   '(bcrypt or SHA-crypt entries) or { bearer = "/etc/gsrv/tokens" } (a token a '
                                   "line), optional realm and failures_per_minute (10); 401 before any child, 429 "
                                   "over the limit", example={"basic": "/etc/gsrv/htpasswd"}, value=None,
                                   reload="the file is read again (a broken one keeps the running config)",
                                   show=lambda c: f"{c.kind} {c.path}" if c else "none")  # fmt: skip
    record: str | None = key(_record_dir, None, "a directory: each session "
                             "recorded there as an asciicast v2 file, SESSION.cast, mode 0600 (output; input "
                             "with record_input; resizes)", example="/var/log/gsrv/casts")  # fmt: skip
    record_input: bool = key(keys.flag(), False, "with record: the client's input recorded too (passwords "
                             "typed included)", shown=False)  # fmt: skip
    record_max: int = key(keys.size(4096, 1 << 40), "64MiB", "with record: a file's largest size; the recording "
                          "is cut there (record_cut=record_max in the log), the session goes on")  # fmt: skip
    stages: tuple[tuple[str, tuple[str, ...]], ...] = ()  # derived: the tty stage (setsid --ctty)


def _check_started_ahead(t: Table, found: dict[str, Any], values: dict[str, Any]) -> None:
    """prespawn and peer_line need gsrv to write the child's stdin, through a pipe."""
    if found["prespawn"] > PRESPAWN_MAX:
        raise t.fail("prespawn", f"must be at most {PRESPAWN_MAX} (got {found['prespawn']})")
    if found["prespawn"] and values["relay"] == "socket":
        raise t.fail("prespawn", 'cannot go with relay = "socket": that child gets the connection itself as its '
                     "stdin and stdout, and a child started before the client connected cannot (use a pipe relay: "
                     'relay = "auto", "splice" or "copy")')  # fmt: skip
    if found["prespawn"] and found["pty"]:
        raise t.fail("prespawn", "cannot go with pty = true: a session's terminal is made when its child starts")
    if found["peer_line"] != "none" and found["pty"]:
        raise t.fail("peer_line", "cannot go with pty = true: the terminal would echo the line to the client")
    if found["peer_line"] != "none" and values["relay"] == "socket":
        raise t.fail("peer_line", 'cannot go with relay = "socket": the child\'s stdin is the connection itself '
                     "(it can ask the socket for its peer)")  # fmt: skip


def _check_recorded(t: Table, found: dict[str, Any], values: dict[str, Any]) -> None:
    """A recording needs the bytes in gsrv: not the child's own socket, not splice."""
    if found.get("record") is None:
        return
    if values["relay"] in ("socket", "splice"):
        raise t.fail("record", f'cannot go with relay = "{values["relay"]}": gsrv must see the bytes to record them '
                     '(use relay = "auto", which then copies, or "copy")')  # fmt: skip


def _show(table: WebSocketConfig | HttpConfig | None) -> str:
    return "{" + " ".join(f"{k}={v}" for k, v in keys.changed(table)) + "}" if table else "none"


def parse_interaction(t: Table, values: dict[str, Any], policy: Policy, environ: dict[str, str]) -> Interaction:
    """The keys, checked against the service's other keys (`values`, whose defaults for
    stderr and env a pty amends)."""
    found = keys.read_all(t, Interaction, skip=("websocket", "http"))
    _check_started_ahead(t, found, values)
    _check_recorded(t, found, values)
    if found.get("auth") is not None and found["transport"] == "tcp":
        raise t.fail("auth", 'needs transport = "http" or "websocket" (a raw TCP client sends no credentials)')
    websocket = _websocket(t, found["transport"], values | {"pty": found["pty"]}, policy)
    http = _http(t, found, values, policy)
    if not found["pty"]:
        return Interaction(**found, websocket=websocket, http=http)
    relay = values["relay"]
    if relay in ("splice", "socket"):
        what = "needs pipes" if relay == "splice" else "gives the child the connection itself"
        raise t.fail("relay", f'is "{relay}", which {what}: with pty = true gsrv copies to and from the '
                     'terminal (use relay = "auto" or "copy")')  # fmt: skip
    if "pipe_size" in t.data:
        raise t.fail("pipe_size", "sizes the stdin and stdout pipes, which a pty replaces (remove the key)")
    if "stderr" not in t.data:
        values["stderr"] = "stdout"
    if not any(name == "TERM" for name, _ in values["env"]):
        values["env"] = (*values["env"], ("TERM", TERM))
    # In place (not a group leader: gsrv spawns a pty child in its own group), a session leader
    # whose controlling terminal is its stdin; it execs the rest.
    stages = (("tty", (util_linux(t, "pty", "setsid", environ), "--ctty")),)
    return Interaction(**found, websocket=websocket, stages=stages)


def _websocket(t: Table, transport: str, values: dict[str, Any], policy: Policy) -> WebSocketConfig | None:
    """The websocket table, with transport = "websocket" only; what cannot go with it."""
    if transport != "websocket":
        if "websocket" in t.data:
            raise t.fail("websocket", 'applies only with transport = "websocket" (this service\'s transport is '
                         f'"{transport}")')  # fmt: skip
        if values["stderr"] == "websocket":
            raise t.fail("stderr", 'is "websocket", which needs transport = "websocket"')
        return None
    relay = values["relay"]
    if relay in ("splice", "socket"):
        raise t.fail("relay", f'is "{relay}", which cannot go with transport = "websocket": gsrv frames the bytes '
                     'itself (use relay = "auto" or "copy")')  # fmt: skip
    for name in ("reject_banner", "busy_banner"):
        if getattr(policy, name):
            raise t.fail(name, 'cannot be combined with transport = "websocket": its raw text would reach '
                         "the client in place of an HTTP answer")  # fmt: skip
    listen = values["listen"]
    local_only = listen.kind == "unix" or (listen.kind == "tcp" and is_loopback(listen.host))
    return parse_websocket(t, "websocket", values["chunk_size"], values["pty"], local_only)


def _http(t: Table, found: dict[str, Any], values: dict[str, Any], policy: Policy) -> HttpConfig | None:
    """The http table, with transport = "http" only; what cannot go with it."""
    if found["transport"] != "http":
        if "http" in t.data:
            raise t.fail("http", f'applies only with transport = "http" (this service\'s transport is '
                         f'"{found["transport"]}")')  # fmt: skip
        return None
    why = {
        "pty": (found["pty"], "a request's child writes a response, not a terminal's screen"),
        "prespawn": (found["prespawn"], "a request's child gets the request in its environment, known only "
                     "once the request came"),
        "peer_line": (found["peer_line"] != "none", "the child's stdin is the request body (REMOTE_ADDR and "
                      "REMOTE_PORT name the client)"),
        "reject_banner": (bool(policy.reject_banner), "its raw text would reach the client in place of an HTTP "
                          "answer"),
        "busy_banner": (bool(policy.busy_banner), "a busy HTTP client gets 503 with Retry-After"),
    }  # fmt: skip
    for name, (on, reason) in why.items():
        if on:
            raise t.fail(name, f'cannot go with transport = "http": {reason}')
    if values["relay"] == "socket":
        raise t.fail("relay", 'is "socket", which cannot go with transport = "http": gsrv reads the request and '
                     'frames the response itself (use relay = "auto" or "copy")')  # fmt: skip
    if values["stderr"] in ("stdout", "websocket"):
        raise t.fail("stderr", f'is "{values["stderr"]}", which cannot go with transport = "http": the child\'s '
                     'stdout is the response (use "log" or "discard")')  # fmt: skip
    if "nonzero_exit" not in t.data:  # an HTTP client learns of a failed child only from a reset
        values["nonzero_exit"] = "reset"
    listen = values["listen"]
    local_only = listen.kind == "unix" or (listen.kind == "tcp" and is_loopback(listen.host))
    return parse_http(t, "http", local_only)
