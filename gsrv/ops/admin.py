"""The admin endpoint on gevent.pywsgi: /metrics (Prometheus), /healthz, /readyz, and the
operator's view (ops/control.py: /sessions, /services, /readyz/NAME).

/readyz is 503 with the reason while the memory guard or a drain holds accept, so a load
balancer takes the node out of rotation; a service at max_sessions is not a reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gsrv.accept.listeners import open_listener, take_listener
from gsrv.config.address import host_port, valid_host
from gsrv.config.parse import AdminConfig
from gsrv.logs import Log
from gsrv.ops.control import Control
from gsrv.ops.history import SAMPLE_S, History
from gsrv.ops.metrics import Metrics, ProcessState
from gsrv.periodic import Periodic

FLUSH_S = 1.0
CONNECTIONS_MAX = 64  # admin connections served at once; more wait in the listener's backlog
IO_TIMEOUT_S = 10.0  # a request's head, and each read or write after it, within this or the connection ends
_EMPTY = ProcessState([], False, 0, 0.0, None, None, 0, 0)

Readiness = Callable[[], str | None]  # None: ready; else why not


class _ErrorLog:
    """pywsgi's error stream, into gsrv's log."""

    def __init__(self, log: Log) -> None:
        self.log = log

    def write(self, text: str) -> None:
        if text.strip():
            self.log.error("admin_error", error=text.strip()[:2000])

    def flush(self) -> None:
        pass


class _HeadLate(TimeoutError, ValueError):
    """No complete request head within IO_TIMEOUT_S: pywsgi ends the connection (an OSError
    while it reads the request line, a client's ValueError in the headers: no traceback)."""


class _Handler(WSGIHandler):  # type: ignore[misc]  # (gevent ships no types for pywsgi)
    """pywsgi's handler under the discipline of a service's door: a request's head (line and
    headers) within IO_TIMEOUT_S however slowly it trickles in, each read or write after it
    within IO_TIMEOUT_S too, or the connection ends; bad bytes get pywsgi's 400, never a 500."""

    def handle(self) -> None:
        self.socket.settimeout(IO_TIMEOUT_S)
        super().handle()

    def handle_one_request(self) -> Any:
        self._head = gevent.Timeout.start_new(IO_TIMEOUT_S, _HeadLate("no complete request head in time"))
        try:
            return super().handle_one_request()
        finally:
            self._head.cancel()

    def read_request(self, raw_requestline: str) -> Any:
        try:
            return super().read_request(raw_requestline)
        finally:
            self._head.cancel()  # the head is in: the answer has the socket's timeout alone


class Admin:
    """Binds at once (a taken port is a startup error); serves from start() on, and feeds the
    byte counters from running sessions every FLUSH_S."""

    def __init__(self, config: AdminConfig, not_ready: Readiness, log: Log, taken: int | None = None) -> None:
        self.not_ready, self.log = not_ready, log
        self.metrics_state: Callable[[], ProcessState] | None = None
        self.metrics = Metrics(lambda: self.metrics_state() if self.metrics_state else _EMPTY)
        self.control = Control(config)
        self.control.history = History(self.metrics.registry)
        if taken is not None:  # an upgrade's previous code listened on it
            sock = take_listener("admin endpoint", taken)
        else:
            sock = open_listener("admin endpoint", config.listen, 128, 0o600, {})
        self.server = WSGIServer(sock, self.app, log=None, error_log=_ErrorLog(log), handler_class=_Handler,
                                 spawn=Pool(CONNECTIONS_MAX))  # fmt: skip
        self._flusher: Periodic | None = None
        self._sampler: Periodic | None = None  # the status page's history

    @property
    def fd(self) -> int:
        """Its listener's (an upgrade hands it over)."""
        return int(self.server.socket.fileno())

    @property
    def address(self) -> str:
        host, port = self.server.socket.getsockname()[:2]
        return host_port(host, port)

    def start(self, flush: Callable[[], None] | None = None) -> None:
        self.server.start()
        self.log.info("admin_listening", address=self.address)
        if flush is not None:
            self._flusher = Periodic(flush, lambda: FLUSH_S)
            self._flusher.start()
        history = self.control.history
        if history is not None:
            history.sample()
            self._sampler = Periodic(history.sample, lambda: SAMPLE_S)
            self._sampler.start()

    def stop(self) -> None:
        for ticker in (self._flusher, self._sampler):
            if ticker is not None:
                ticker.stop()
        self.server.stop(timeout=1)

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path, host = environ.get("PATH_INFO", ""), environ.get("HTTP_HOST", "")
        if not valid_host(host):
            body = f"Host {json.dumps(host[:64], ensure_ascii=True)} is not a host and port\n".encode()
            start_response("400 Bad Request", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        if self.control.handles(path):
            reply = self.control.handle(environ)
            if isinstance(reply.body, bytes):
                start_response(reply.status, [("Content-Type", reply.kind), ("Content-Length", str(len(reply.body))),
                                              *reply.headers])  # fmt: skip
                return [reply.body]
            start_response(reply.status, [("Content-Type", reply.kind), *reply.headers])  # chunked
            return reply.body
        if path == "/metrics":
            body, status, kind = generate_latest(self.metrics.registry), "200 OK", CONTENT_TYPE_LATEST
        elif path == "/healthz":
            body, status, kind = b"ok\n", "200 OK", "text/plain"
        elif path == "/readyz":
            why = self.not_ready()
            if why is None:
                body, status = b"ready\n", "200 OK"
            else:
                body, status = f"not ready: {why}\n".encode(), "503 Service Unavailable"
            kind = "text/plain"
        else:
            body, status, kind = (b"not found: try /metrics, /healthz, /readyz, /readyz/SERVICE, /sessions or "
                                  b"/services\n", "404 Not Found", "text/plain")  # fmt: skip
        start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]
