"""gsrv's HTTP/1.1 front: a connection across its requests (`transport = "http"`): the bytes
read past the last request, how many it served, the head of the one it is in, read and checked
(edge/httphead.py: the raw bytes, then h11) before any child starts, and a refusal answered
here. The WebSocket upgrade reads its request with the same `read_head`.
"""

from __future__ import annotations

import contextlib
from typing import NoReturn

from gsrv.config.http import HttpConfig
from gsrv.edge.httphead import MAX_TARGET, HeadError, Request, head_end, judge, parse, short_response
from gsrv.edge.stream import Refused, Stream

READ_CHUNK = 4096  # at most so many bytes a read of the request head
MAX_LINE = MAX_TARGET + 64  # where a refused head's request line may say HTTP/1.0


class Quiet(Exception):  # noqa: N818 (not an error: a kept-alive client closed between requests)
    """The client closed a kept-alive connection before a byte of its next request."""


class HttpConnection:
    """One HTTP connection's state between its requests (in the Prelude; keep-alive carries it to the next request)."""

    __slots__ = ("stream", "secure", "buffered", "served", "request", "status")

    def __init__(self, stream: Stream, secure: bool) -> None:
        self.stream, self.secure = stream, secure
        self.buffered = b""  # read from the client, not yet used: the next request's bytes
        self.served = 0  # requests whose child ran
        self.request: Request | None = None
        self.status: int | None = None  # the status gsrv itself sent for the request in hand (a refusal, a page)

    def take(self, most: int) -> bytes:
        """Up to most of the bytes already read."""
        data, self.buffered = self.buffered[:most], self.buffered[most:]
        return data

    def read_request(self, cfg: HttpConfig) -> Request:
        """The next request's head, judged against the service's http table. Raises Refused
        once gsrv answered it itself, Quiet when a kept-alive client closed first (OSError: the
        connection failed)."""
        request = self.read_head()
        try:
            judge(request, cfg)
        except HeadError as e:
            self.refuse(e.status, e.reason, str(e))
        return request

    def read_head(self) -> Request:
        """The next request's head (the HTTP front transport = "http" and the WebSocket upgrade
        share): its end found and its raw bytes checked by gsrv, then parsed by h11."""
        self.request, self.status = None, None
        buffer = self.buffered
        try:
            while True:
                while buffer.startswith(b"\r\n"):  # empty lines before a request line are ignored
                    buffer = buffer[2:]
                end = head_end(buffer)
                if end:
                    break
                data = self.stream.recv(READ_CHUNK)
                if not data:
                    if not buffer and self.served:
                        raise Quiet()
                    raise Refused("bad_request", "the connection closed before a complete HTTP request")
                buffer += data
            self.buffered = buffer[end:]
            request = parse(buffer[:end])
        except HeadError as e:
            one_oh = buffer[:MAX_LINE].partition(b"\r\n")[0].endswith(b" HTTP/1.0")
            self.refuse(e.status, e.reason, str(e), version="1.0" if one_oh else "1.1")
        self.request = request
        return request

    def refuse(self, status: int, reason: str, error: str, fields: tuple[tuple[str, str], ...] = (),
               version: str = "1.1") -> NoReturn:  # fmt: skip
        """Answer with status (Connection: close) and raise Refused: the connection ends. The
        status line says HTTP/1.0 to a 1.0 request (`version`: a head refused before its parse)."""
        self.status = status
        request = self.request
        head_only, version = (request.method == "HEAD", request.version) if request is not None else (False, version)
        with contextlib.suppress(OSError):
            self.stream.send(short_response(status, error, version, head_only, fields))
        raise Refused(reason, error)

    def send_page(self, body: bytes, kind: str, policy: str | None = None) -> None:
        """A 200 with a file of gsrv's (the WebSocket console's page and its assets), with a
        Content-Security-Policy when given, then the connection ends."""
        head_only = self.request is not None and self.request.method == "HEAD"
        self.status = 200
        csp = f"Content-Security-Policy: {policy}\r\nX-Content-Type-Options: nosniff\r\n" if policy else ""
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n{csp}"
                "Connection: close\r\nCache-Control: no-store\r\n\r\n")  # fmt: skip
        with contextlib.suppress(OSError):
            self.stream.send(head.encode() + (b"" if head_only else body))

    def timed_out(self) -> NoReturn:
        """handshake_timeout passed inside a head: 408, and the connection ends."""
        self.refuse(408, "head_timeout", "the request head was not complete in time")
