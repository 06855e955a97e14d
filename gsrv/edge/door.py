"""Between accept() and a session's start: the PROXY header, access rules and per-IP limits,
the TLS handshake. A refusal ends only its own connection, with its reason and log line.

`screen` runs in the accept loop and never yields; `prelude` runs in its own greenlet under
the service's proxy_timeout and handshake_timeout, while the gate counts it as pending.
"""

from __future__ import annotations

import contextlib
import math
import socket as stdsocket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import gevent
from gevent.socket import socket

from gsrv.config.auth import Credentials, same_token
from gsrv.config.http import HttpConfig
from gsrv.config.policy import Policy
from gsrv.config.web import WebSocketConfig
from gsrv.edge import proxy
from gsrv.edge.access import Admission, allowed
from gsrv.edge.arrival import Prelude, Visit
from gsrv.edge.auth import Gatekeeper
from gsrv.edge.hello import Declined, Hello, read_hello
from gsrv.edge.http import HttpConnection, Quiet
from gsrv.edge.httphead import HeadError
from gsrv.edge.proxy import ProxyError, ProxyHeader
from gsrv.edge.refusal import Refusals
from gsrv.edge.stream import PlainStream, Refused, Stream
from gsrv.edge.tls import TlsStream
from gsrv.edge.upgrade import Site, Upgraded, speaks_term, upgrade
from gsrv.edge.wsframes import FrameReader, ProtocolError, close
from gsrv.errors import GsrvError

CLOSE_FRAME_S = 2.0  # a refused hello's close frame: how long it may take to go out


class TooSlow(GsrvError):
    """A client did not finish its PROXY header or TLS handshake in time."""


Resume = Callable[[Visit, Hello], None]  # a reattach or a watcher handed to its session; raises Declined


class Joined:
    """A prelude's outcome when a hello named a running session: the connection is that
    session's now (a reattach, a watcher), neither a new session nor a refusal."""


JOINED = Joined()


class _Progress:
    """A visit as far as its prelude got: each step's finding makes a new (frozen) visit here,
    and a refusal's line says what was found by then (the proxy's client, TLS, the user)."""

    __slots__ = ("visit",)

    def __init__(self, visit: Visit) -> None:
        self.visit = visit

    def found(self, **found: Any) -> Visit:
        self.visit = replace(self.visit, prelude=replace(self.visit.prelude, **found))
        return self.visit


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

    def screen(self, visit: Visit) -> bool:
        """At accept, without yielding; False when the connection was refused."""
        p, peer_ip = self.policy, visit.arrival.peer_ip
        if p.proxy_protocol != "off":
            if not allowed(peer_ip, p.proxy_trusted, ()):
                self.refusals.refuse(visit, "proxy_failed", error=f"{visit.arrival.peer_text} is not in proxy_trusted")
                return False
            return True  # the rules and limits judge the client the header names
        return self._admit(visit, peer_ip, peer_ip)

    def prelude(self, visit: Visit) -> Prelude | Joined | None:
        """The header, its client's rules and limits, the TLS handshake, the WebSocket upgrade
        or the HTTP request's head (a kept-alive connection's next request: the head alone):
        what it found, JOINED when a hello handed the connection to a running session, None
        when it was refused or the server is stopping (its line written). Never raises."""
        p, refuse, seen = self.policy, self.refusals.refuse, _Progress(visit)
        reason = "proxy_failed"
        try:
            if visit.prelude.http is not None:  # a kept-alive connection's next request
                return self._request(visit, visit.prelude.http)
            if p.proxy_protocol != "off":
                with gevent.Timeout(p.proxy_timeout, TooSlow(f"no complete PROXY header within {p.proxy_timeout:g}s")):
                    header = read_header(visit.sock, p.proxy_protocol)
                named = header.source if not header.local and isinstance(header.source, tuple) else None
                visit = seen.found(header=header, client=named)
                rule_ip = visit.client_ip if p.access_on == "proxy" else visit.arrival.peer_ip
                if not self._admit(visit, rule_ip, visit.client_ip):
                    return None
            if p.tls is not None:
                reason = "tls_failed"
                stream = TlsStream(visit.sock, p.tls.context)
                timeout = p.tls.handshake_timeout
                with gevent.Timeout(timeout, TooSlow(f"no complete TLS handshake within {timeout:g}s")):
                    stream.handshake()
                visit = seen.found(tls=stream)
            if self.websocket is not None:
                reason = "bad_request"
                return self._upgrade(seen, self.websocket)
            if self.http is not None:
                tls = visit.prelude.tls
                conn = HttpConnection(tls or PlainStream(visit.sock), tls is not None)
                return self._request(seen.found(http=conn), conn)
            return visit.prelude
        except Refused as e:
            refuse(seen.visit, e.reason, error=str(e) or None, answered=True)
        except gevent.GreenletExit:
            refuse(seen.visit, "shutdown")
        except ssl.SSLError as e:
            refuse(seen.visit, reason, error=f"{e.reason or e}")
        except (ProxyError, TooSlow) as e:
            refuse(seen.visit, reason, error=str(e))
        except OSError as e:
            refuse(seen.visit, reason, error=e.strerror or str(e))
        return None

    def _upgrade(self, seen: _Progress, ws: WebSocketConfig) -> Prelude | Joined:
        """The WebSocket upgrade (and the terminal page's hello) under handshake_timeout; a hello
        naming a running session hands the connection over (its replay has no deadline: a slow
        page is backpressure). Raises as prelude's steps do."""
        tls = seen.visit.prelude.tls
        late = TooSlow(f"no complete WebSocket upgrade (and hello) within {ws.handshake_timeout:g}s")
        deadline = time.monotonic() + ws.handshake_timeout
        with gevent.Timeout(ws.handshake_timeout, late):
            upgraded = upgrade(tls or PlainStream(seen.visit.sock), ws, tls is not None, self.site,
                               lambda conn: seen.found(user=self._authorize(seen.visit, conn, deadline)))  # fmt: skip
            seen.found(websocket=upgraded)
            if upgraded.term:
                self._hello(seen, upgraded, deadline)
        visit = seen.visit
        hello = visit.prelude.hello
        if hello is not None and (hello.resume is not None or hello.watch is not None):
            self._join(visit, hello)
            return JOINED
        return visit.prelude

    def _request(self, visit: Visit, conn: HttpConnection) -> Prelude | None:
        """An HTTP request's head, read under handshake_timeout (then 408) and judged."""
        http = self.http
        if http is None:  # a reload changed the transport: this connection ends here
            self.refusals.refuse(visit, "shutdown", error="the service no longer speaks HTTP")
            return None
        try:
            try:
                deadline = time.monotonic() + http.handshake_timeout
                with gevent.Timeout(http.handshake_timeout, TooSlow()):
                    conn.read_request(http)
                    user = self._authorize(visit, conn, deadline)
            except TooSlow:
                conn.timed_out()
            return replace(visit.prelude, user=user)
        except Refused as e:
            self.refusals.refuse(visit, e.reason, error=str(e) or None, answered=True)
        except Quiet:
            self.refusals.quiet(visit)
        except gevent.GreenletExit:
            self.refusals.refuse(visit, "shutdown")
        except OSError as e:
            self.refusals.refuse(visit, "client_reset", error=e.strerror or str(e))
        return None

    def _authorize(self, visit: Visit, conn: HttpConnection, deadline: float) -> tuple[str, str] | None:
        """The request's credentials (auth): the user, or 401/429 answered (Refused). The
        terminal page's upgrade without Authorization brings its token in the hello (_hello).
        `deadline`: the client's handshake deadline, which a verification waits for a slot until."""
        request = conn.request
        assert request is not None
        ws, protocols = self.websocket, request.header("sec-websocket-protocol") or ""
        if ws and request.header("authorization") is None and speaks_term(ws, protocols):
            return None
        try:
            return self.gatekeeper.check(request.header("authorization"), visit.client_ip, deadline)
        except HeadError as e:
            retry = "1" if e.reason == "auth_busy" else "60"
            fields = self.gatekeeper.challenge() if e.status == 401 else (("Retry-After", retry),)
            conn.refuse(e.status, e.reason, str(e), fields)

    def _hello(self, seen: _Progress, upgraded: Upgraded, deadline: float) -> None:
        """The terminal page's first message (edge/hello.py), its bearer token checked when
        the upgrade brought no credentials. A hello refused closes with its code (Refused)."""
        reader, stream = FrameReader(), upgraded.stream
        with self._declining(stream):
            hello = read_hello(stream, reader, upgraded.leftover)
            visit = seen.found(websocket=replace(upgraded, leftover=b"", reader=reader), hello=hello)
            header = upgraded.request.header("authorization")
            if hello.bearer is not None and header is not None:  # two credentials: they must be one
                scheme, _, value = header.strip().partition(" ")
                if scheme.lower() != "bearer" or not same_token(value.strip(), hello.bearer):
                    raise Declined("unauthorized", "the hello's bearer token is not the upgrade's Authorization")
            if self.gatekeeper.credentials is not None and visit.prelude.user is None:
                bearer = f"Bearer {hello.bearer}" if hello.bearer else None
                try:
                    seen.found(user=self.gatekeeper.check(bearer, visit.client_ip, deadline))
                except HeadError as e:
                    raise Declined(e.reason, str(e)) from None

    def _join(self, visit: Visit, hello: Hello) -> None:
        """A hello that names a running session (a reattach, a watcher): the service hands the
        connection to it, or it is refused with its close code (Refused)."""
        assert visit.prelude.websocket is not None
        with self._declining(visit.prelude.websocket.stream):
            if self.resume is None:
                raise Declined("no_session", "this service keeps no session to reattach to or watch")
            self.resume(visit, hello)

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

    def busy(self, visit: Visit) -> None:
        """A client held queue_timeout without a slot (or at a pause that answers): each
        transport's busy answer after its prelude, then the connection ends (reason busy): HTTP
        503 with Retry-After, WebSocket close 1013 after the 101, raw TCP (plain or TLS)
        busy_banner and a FIN. At most CLOSE_FRAME_S for the answer to go out."""
        p, prelude = self.policy, visit.prelude
        error = f"no session slot within queue_timeout ({p.queue_timeout:g}s)"
        banner, answered = p.busy_banner.encode(), True
        with contextlib.suppress(OSError, Refused), gevent.Timeout(CLOSE_FRAME_S, False):
            if prelude.http is not None:
                retry = str(max(1, math.ceil(p.queue_timeout)))
                prelude.http.refuse(503, "busy", error, (("Retry-After", retry),))  # raises Refused once sent
            elif prelude.websocket is not None:
                prelude.websocket.stream.send(close(1013, "busy"))
                prelude.websocket.stream.close_notify()
            elif prelude.tls is not None:
                if banner:
                    prelude.tls.send(banner)
                prelude.tls.close_notify()
            else:
                answered = False  # the banner goes out below, on the plain socket
        self.refusals.refuse(visit, "busy", b"" if answered else banner, error=error, answered=answered)

    def counted(self, visit: Visit) -> None:
        """A session an upgrade moved: counted against its client's address as at its admission."""
        admission, ip = self.admission, visit.client_ip
        admission.hold(ip)
        visit.arrival.at_end(lambda: admission.release(ip))

    def _admit(self, visit: Visit, rule_ip: str | None, ip: str | None) -> bool:
        refused = self.admission.check(rule_ip, ip, time.monotonic())
        if refused is not None:
            banner = self.policy.reject_banner if refused != "denied" else ""
            self.refusals.refuse(visit, refused, banner.encode())
            return False
        admission = self.admission
        visit.arrival.at_end(lambda: admission.release(ip))
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
