"""The relay a session gets, chosen once at its start from its service's keys and its
connection: the relay protocol's implementations in one place (relay/relays.py says what
each does)."""

from __future__ import annotations

from collections.abc import Callable

from gsrv.config.parse import ServiceConfig
from gsrv.edge.arrival import Visit
from gsrv.relay import relays
from gsrv.relay.childend import Pipes, PtyEnd
from gsrv.relay.handoff import SocketRelay
from gsrv.relay.http.relay import HttpRelay
from gsrv.relay.pump import HAS_SPLICE
from gsrv.relay.record import Recording
from gsrv.relay.relays import Relay
from gsrv.relay.ws.relay import WebSocketRelay


def choose(svc: ServiceConfig, visit: Visit, eof_grace: float, recording: Callable[[], Recording]) -> Relay:
    """The service's relay key for this connection: TLS needs the bytes in userland, and so
    does a pty (the master is no pipe); splice needs a platform that has it; "socket" hands the
    connection to the child; a recording needs the bytes too (record = DIR: copy), and gets
    the relay's `recording` (each relay that pumps the bytes: all but socket handoff)."""
    relay = _chosen(svc, visit, eof_grace)
    if svc.interact.record and isinstance(relay, relays.PipeRelay):
        relay.recording = recording()
    return relay


def _chosen(svc: ServiceConfig, visit: Visit, eof_grace: float) -> Relay:
    sock, relay, chunk, found = visit.sock, svc.relay, svc.chunk_size, visit.prelude
    splice_ok = relay != "copy" and HAS_SPLICE and not svc.interact.record
    child_end = PtyEnd(eof_grace) if svc.interact.pty else Pipes()
    if found.http is not None and svc.interact.http is not None:
        splice_body = splice_ok and found.tls is None
        return HttpRelay(sock, chunk, found.http, svc.interact.http, splice_body)
    upgraded = found.websocket
    if upgraded is not None and svc.interact.websocket is not None:
        stderr_channel = svc.stderr == "websocket"
        return WebSocketRelay(sock, chunk, upgraded, svc.interact.websocket, child_end, stderr_channel)
    if found.tls is not None:
        return relays.TlsRelay(sock, chunk, found.tls, child_end)
    if relay == "socket":
        return SocketRelay(sock, found.header.length if found.header else 0)
    if splice_ok and not svc.interact.pty:
        return relays.SpliceRelay(sock, chunk)
    return relays.PipeRelay(sock, chunk, child_end)
