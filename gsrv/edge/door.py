"""Between accept() and a session's start: the PROXY header, access rules and per-IP limits,
the TLS handshake. A refusal ends only its own connection, with its reason and log line.

`screen` runs in the accept loop and never yields; `prelude` runs in its own greenlet under
the service's proxy_timeout and handshake_timeout, while the gate counts it as pending.
"""

from __future__ import annotations

import contextlib
import socket as stdsocket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import gevent
from gevent.socket import socket

from gsrv.config.auth import Credentials
from gsrv.config.http import HttpConfig
from gsrv.config.policy import Policy
from gsrv.config.web import WebSocketConfig
from gsrv.edge import proxy
from gsrv.edge.access import Admission, allowed
from gsrv.edge.arrival import Arrival
from gsrv.edge.auth import Gatekeeper
from gsrv.edge.hello import Declined, Hello, read_hello
from gsrv.edge.http import HttpConnection, Quiet
from gsrv.edge.httphead import HeadError
from gsrv.edge.proxy import ProxyError, ProxyHeader
from gsrv.edge.refusal import Refusals
from gsrv.edge.stream import PlainStream, Refused, Stream
from gsrv.edge.tls import TlsStream
from gsrv.edge.upgrade import Site, speaks_term, upgrade
from gsrv.edge.wsframes import FrameReader, ProtocolError, close
from gsrv.errors import GsrvError

CLOSE_FRAME_S = 2.0  # a refused hello's close frame: how long it may take to go out


class TooSlow(GsrvError):
    """A client did not finish its PROXY header or TLS handshake in time."""


Resume = Callable[[Arrival, Hello], None]  # a reattach or a watcher handed to its session; raises Declined


class Door:
    """One service's door; the policy follows reloads, the per-address counts stay."""

    def __init__(self, policy: Policy, refusals: Refusals, resume: Resume | None = None) -> None:
        self.admission = Admission(policy)
        self.refusals = refusals
        self.websocket: WebSocketConfig | None = None
        self.site: Site = {}
        self.http: HttpConfig | None = None
        self.gatekeeper = Gatekeeper()
        self.resume = resume  # a terminal page's hello with a session's token: the service hands it over

    @property
    def policy(self) -> Policy:
        return self.admission.policy

    def update(self, policy: Policy, websocket: WebSocketConfig | None = None, site: Site | None = None,
               http: HttpConfig | None = None, credentials: Credentials | None = None) -> None:  # fmt: skip
        self.admission.policy = policy
        self.websocket, self.site, self.http = websocket, site or {}, http
        self.gatekeeper.update(credentials)

    @property
    def has_prelude(self) -> bool:
        p = self.policy
        return p.tls is not None or p.proxy_protocol != "off" or self.websocket is not None or self.http is not None

    def screen(self, arrival: Arrival) -> bool:
        """At accept, without yielding; False when the connection was refused."""
        p = self.policy
        if p.proxy_protocol != "off":
            if not allowed(arrival.peer_ip, p.proxy_trusted, ()):
                self.refusals.refuse(arrival, "proxy_failed", error=f"{arrival.peer_text} is not in proxy_trusted")
                return False
            return True  # the rules and limits judge the client the header names
        return self._admit(arrival, arrival.peer_ip, arrival.peer_ip)

    def prelude(self, arrival: Arrival) -> bool:
        """The header, its client's rules and limits, the TLS handshake, the WebSocket upgrade
        or the HTTP request's head (a kept-alive connection's next request: the head alone).
        Never raises; False when the connection was refused or the server is stopping."""
        p, refuse = self.policy, self.refusals.refuse
        reason = "proxy_failed"
        try:
            if arrival.http is not None:  # a kept-alive connection's next request
                return self._request(arrival, arrival.http)
            if p.proxy_protocol != "off":
                with gevent.Timeout(p.proxy_timeout, TooSlow(f"no complete PROXY header within {p.proxy_timeout:g}s")):
                    arrival.proxied(read_header(arrival.sock, p.proxy_protocol))
                rule_ip = arrival.client_ip if p.access_on == "proxy" else arrival.peer_ip
                if not self._admit(arrival, rule_ip, arrival.client_ip):
                    return False
            if p.tls is not None:
                reason = "tls_failed"
                stream = TlsStream(arrival.sock, p.tls.context)
                timeout = p.tls.handshake_timeout
                with gevent.Timeout(timeout, TooSlow(f"no complete TLS handshake within {timeout:g}s")):
                    stream.handshake()
                arrival.tls = stream
            ws = self.websocket
            if ws is not None:
                reason = "bad_request"
                timeout = ws.handshake_timeout
                transport = arrival.tls or PlainStream(arrival.sock)
                with gevent.Timeout(timeout, TooSlow(f"no complete WebSocket upgrade (and hello) within {timeout:g}s")):
                    arrival.websocket = upgrade(transport, ws, arrival.tls is not None, self.site,
                                                lambda conn: self._authorize(arrival, conn))  # fmt: skip
                    if arrival.websocket.term:
                        self._hello(arrival)
                hello = arrival.hello
                if hello is not None and (hello.resume is not None or hello.watch is not None):
                    self._join(arrival, hello)  # (its replay has no deadline: a slow page is backpressure)
                    return False  # the connection is that session's now
            if self.http is not None:
                arrival.http = HttpConnection(arrival.tls or PlainStream(arrival.sock), arrival.tls is not None)
                return self._request(arrival, arrival.http)
            return True
        except Refused as e:
            refuse(arrival, e.reason, error=str(e) or None, answered=True)
        except gevent.GreenletExit:
            refuse(arrival, "shutdown")
        except ssl.SSLError as e:
            refuse(arrival, reason, error=f"{e.reason or e}")
        except (ProxyError, TooSlow) as e:
            refuse(arrival, reason, error=str(e))
        except OSError as e:
            refuse(arrival, reason, error=e.strerror or str(e))
        return False

    def _request(self, arrival: Arrival, conn: HttpConnection) -> bool:
        """An HTTP request's head, read under handshake_timeout (then 408) and judged."""
        http = self.http
        if http is None:  # a reload changed the transport: this connection ends here
            self.refusals.refuse(arrival, "shutdown", error="the service no longer speaks HTTP")
            return False
        try:
            try:
                with gevent.Timeout(http.handshake_timeout, TooSlow()):
                    conn.read_request(http)
                    self._authorize(arrival, conn)
            except TooSlow:
                conn.timed_out()
            return True
        except Refused as e:
            self.refusals.refuse(arrival, e.reason, error=str(e) or None, answered=True)
        except Quiet:
            self.refusals.quiet(arrival)
        except gevent.GreenletExit:
            self.refusals.refuse(arrival, "shutdown")
        except OSError as e:
            self.refusals.refuse(arrival, "client_reset", error=e.strerror or str(e))
        return False

    def _authorize(self, arrival: Arrival, conn: HttpConnection) -> None:
        """The request's credentials (auth): the user on the arrival, or 401/429 answered. The
        terminal page's upgrade without Authorization brings its token in the hello (_hello)."""
        request = conn.request
        assert request is not None
        ws, protocols = self.websocket, request.header("sec-websocket-protocol") or ""
        if ws and request.header("authorization") is None and speaks_term(ws, protocols):
            return
        try:
            arrival.user = self.gatekeeper.check(request.header("authorization"), arrival.client_ip)
        except HeadError as e:
            fields = self.gatekeeper.challenge() if e.status == 401 else (("Retry-After", "60"),)
            conn.refuse(e.status, e.reason, str(e), fields)

    def _hello(self, arrival: Arrival) -> None:
        """The terminal page's first message (edge/hello.py), its bearer token checked when
        the upgrade brought no credentials. A hello refused closes with its code (Refused)."""
        upgraded = arrival.websocket
        assert upgraded is not None
        reader, stream = FrameReader(), upgraded.stream
        with self._declining(stream):
            hello = read_hello(stream, reader, upgraded.leftover)
            arrival.websocket, arrival.hello = replace(upgraded, leftover=b"", reader=reader), hello
            if self.gatekeeper.credentials is not None and arrival.user is None:
                bearer = f"Bearer {hello.bearer}" if hello.bearer else None
                try:
                    arrival.user = self.gatekeeper.check(bearer, arrival.client_ip)
                except HeadError as e:
                    raise Declined(e.reason, str(e)) from None

    def _join(self, arrival: Arrival, hello: Hello) -> None:
        """A hello that names a running session (a reattach, a watcher): the service hands the
        connection to it, or it is refused with its close code (Refused)."""
        assert arrival.websocket is not None
        with self._declining(arrival.websocket.stream):
            if self.resume is None:
                raise Declined("no_session", "this service keeps no session to reattach to or watch")
            self.resume(arrival, hello)

    @contextlib.contextmanager
    def _declining(self, stream: Stream) -> Iterator[None]:
        """A hello gsrv will not follow: its close frame, then Refused for the prelude's line."""
        try:
            yield
        except (ProtocolError, Declined) as e:
            reason, text = ("protocol_error", str(e)) if isinstance(e, ProtocolError) else (e.reason, e.reason)
            with gevent.Timeout(CLOSE_FRAME_S, False):
                stream.send(close(e.code, text))
                stream.close_notify()
            raise Refused(reason, str(e)) from None

    def _admit(self, arrival: Arrival, rule_ip: str | None, ip: str | None) -> bool:
        refused = self.admission.check(rule_ip, ip, time.monotonic())
        if refused is not None:
            banner = self.policy.reject_banner if refused != "denied" else ""
            self.refusals.refuse(arrival, refused, banner.encode())
            return False
        admission = self.admission
        arrival.at_end(lambda: admission.release(ip))
        return True


def read_header(sock: socket, version: str) -> ProxyHeader:
    """Read exactly the PROXY header (never a byte of what follows). Raises ProxyError."""
    data = b""
    while True:
        if version == "v2":
            chunk = sock.recv(proxy.safe_read(data, version))
        else:  # v1 has no length: peek, and take up to the CRLF only
            peeked = sock.recv(proxy.V1_MAX - len(data), stdsocket.MSG_PEEK)
            end = (data + peeked).find(b"\r\n")
            if peeked and end < 0:
                proxy.parse(data + peeked, version)  # raises now if it cannot become a header
            chunk = sock.recv(end + 2 - len(data) if end >= 0 else len(peeked)) if peeked else b""
        if not chunk:
            raise ProxyError(f"the connection closed {'inside' if data else 'before'} the PROXY header")
        data += chunk
        header = proxy.parse(data, version)
        if header is not None:
            return header
