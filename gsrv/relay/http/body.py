"""One HTTP request's body as the child's stdin reads it: a Content-Length body (what came with
the head first, then at most what is left: never a byte of the next request) or a chunked one
de-chunked by a strict reader of its framing (what it read past the last chunk is the next
request's). They read the connection and count into a `BodyRead`, which owns their failure.
"""

from __future__ import annotations

from gsrv.edge.chunked import ChunkError, Dechunker
from gsrv.edge.http import HttpConnection
from gsrv.relay.http.cgi import Broken, Failure
from gsrv.relay.pump import Source


class Cut(OSError):
    """The request body ended before its framing said (or broke it): never a clean EOF."""


class BodyRead:
    """The request body taken from the client so far (to the child or dropped), its limit, and
    the failure of the body's reading."""

    __slots__ = ("total", "max_body", "failure")

    def __init__(self, max_body: int = 0) -> None:
        self.total = 0
        self.max_body = max_body  # 0: none (a Content-Length over it was refused with the head)
        self.failure: Failure | None = None


class LengthBody:
    """A Content-Length body: what was read with the head first, then the client, to its length."""

    __slots__ = ("conn", "client", "count", "left")

    def __init__(self, conn: HttpConnection, client: Source, count: BodyRead, length: int) -> None:
        self.conn, self.client, self.count = conn, client, count
        self.left = length - count.total

    def read(self, limit: int) -> memoryview | bytes:
        if self.left <= 0:
            return b""
        data = self.conn.take(min(limit, self.left)) or self.client.read(min(limit, self.left))
        if not data:
            raise Cut("the client ended before its Content-Length")
        self.left -= len(data)
        self.count.total += len(data)
        return data

    def done(self) -> None:
        self.client.done()

    def close(self) -> None:
        self.client.close()


class ChunkedBody:
    """A chunked body, its framing read strictly (edge/chunked.py); max_body counts it."""

    __slots__ = ("conn", "client", "count", "chunk", "framing")

    def __init__(self, conn: HttpConnection, client: Source, count: BodyRead, chunk: int) -> None:
        self.conn, self.client, self.count, self.chunk = conn, client, count, chunk
        self.framing = Dechunker()

    def read(self, limit: int) -> bytes:
        framing, conn, count = self.framing, self.conn, self.count
        if conn.buffered:
            framing.feed(conn.take(len(conn.buffered)))
        while True:
            try:
                data = framing.next()
            except ChunkError as e:
                raise Cut(f"the chunked body is malformed: {e}") from None
            if data is None:
                more = self.client.read(self.chunk)
                if not more:
                    raise Cut("the client ended before the chunked body's last chunk")
                framing.feed(more)
                self.client.done()
                continue
            if not data:
                conn.buffered = framing.rest  # the next request's
                return b""
            count.total += len(data)
            if count.max_body and count.total > count.max_body:
                count.failure = Failure("body_too_large", f"the chunked body is over max_body ({count.max_body})")
                raise Broken(count.failure.error)
            return data

    def done(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()
