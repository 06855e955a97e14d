"""The HTTP relay (`transport = "http"`): one request's body to its child's stdin as it arrives
(Content-Length or chunked, de-chunked), and the child's output as the response as it comes
(`output`: a CGI header block, the whole response, or the body alone), over the plain
connection or TLS, after the head was read and judged (edge/http.py).

Neither side waits for the other: the output is read from the child's start, whatever the body
does. A failure never looks complete: a response whose head went out ends without its last
chunk, short of its Content-Length (the last byte is held until the child's exit is known), or
with a reset; one whose head did not gets a status of gsrv's own with the child's exit. A body
cut short never reaches the child as an EOF: its ladder signals before stdin closes
(`cut_input`). A response that ends cleanly after its whole body keeps the connection for the
next request (`kept_alive`).
"""

from __future__ import annotations

import contextlib
import select
import socket as stdsocket

from gevent.socket import socket

from gsrv.config.http import HttpConfig
from gsrv.edge.http import HttpConnection
from gsrv.edge.httphead import short_response
from gsrv.edge.refusal import reset
from gsrv.edge.tls import TlsStream
from gsrv.loop import WRITE
from gsrv.relay.child import Child
from gsrv.relay.childend import Pipes
from gsrv.relay.http.body import BodyRead, ChunkedBody, LengthBody
from gsrv.relay.http.cgi import (
    MAX_BLOCK,
    BadHead,
    Failure,
    Head,
    block_end,
    failure_status,
    parse_block,
    with_length,
)
from gsrv.relay.http.response import NO_BODY, Response
from gsrv.relay.linger import fin_and_linger
from gsrv.relay.pump import Discard, End, Fd, FdSource, Source, move, splice
from gsrv.relay.relays import Closing, PipeRelay, RelayEvents, TlsSource

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HttpRelay(PipeRelay):
    """One request: its body to the child, the child's output as its response."""

    __slots__ = ("conn", "http", "request", "splice_body", "response", "body_read", "broke", "body_done", "body_cut",
                 "kept_alive")  # fmt: skip

    def __init__(self, sock: socket, chunk: int, conn: HttpConnection, http: HttpConfig, splice_body: bool) -> None:
        super().__init__(sock, chunk, Pipes())
        assert conn.request is not None
        request = self.request = conn.request
        self.conn, self.http = conn, http
        self.splice_body = splice_body and request.content_length is not None
        close_after = request.wants_close or not http.between_requests or conn.served + 1 >= http.max_requests
        self.response = Response(conn.stream.send, request.version, request.method, request.takes_trailers,
                                 close_after)  # fmt: skip
        self.body_read = BodyRead(http.max_body)  # what was taken from the client: to the child, or dropped
        self.broke: Failure | None = None  # the child's output was no response (its header block)
        self.body_done = not request.has_body  # the request body's framing was read to its end
        self.body_cut = False  # the body was cut short: the child must not see its stdin end first
        self.kept_alive = False  # the connection stays for the next request

    @property
    def cut_input(self) -> bool:
        """The body was cut short (its input's end is the body's, not the connection's)."""
        return self.body_cut

    @property
    def name(self) -> str:
        return "splice" if self.splice_body else "copy"

    @property
    def http_status(self) -> int | None:
        """The status the client got (None: none went out)."""
        return self.response.status

    @property
    def failure(self) -> Failure | None:
        """Why the exchange broke, by the side that broke it: the child's output, the response's
        framing, the request body's."""
        return self.broke or self.response.failure or self.body_read.failure

    def log_fields(self) -> dict[str, object]:
        failure = self.failure
        return {"method": self.request.method, "path": self.request.path, "status": self.http_status,
                **super().log_fields(), "error": failure.error if failure else None}  # fmt: skip

    def start(self, child: Child, events: RelayEvents) -> None:
        if self.request.expects_continue and not self.body_done and not self.conn.buffered:
            with contextlib.suppress(OSError):  # a client gone: its body's read says so
                self.conn.stream.send(CONTINUE)  # the child runs: the client may send its body
        super().start(child, events)

    # -- the request body: client -> child -------------------------------------------------

    def _in(self, child: Child) -> End:
        if self.body_done:
            return End.SOURCE_EOF
        if self.splice_body:
            return self._splice_in(child)
        end = move(self._body(), self._child_sink(child), self.inbound, self.chunk)
        self._body_ended(end)
        return end

    def _splice_in(self, child: Child) -> End:
        length = self.request.content_length or 0
        first = self.conn.take(length)
        self.body_read.total = len(first)
        sink = Fd(child.stdin, WRITE)
        try:
            sink.write_all(first)
        except OSError:
            return End.SINK_CLOSED
        finally:
            sink.close()
        self.inbound.moved(len(first))
        end = splice(self.sock.fileno(), child.stdin, self.inbound, True, length - len(first))
        self.body_read.total = self.inbound.total
        if end is End.SOURCE_EOF and self.body_read.total < length:
            self.body_cut, end = True, End.SOURCE_ERROR
        self._body_ended(end)
        return end

    def _body(self) -> Source:
        stream = self.conn.stream
        client: Source = (
            TlsSource(stream) if isinstance(stream, TlsStream) else FdSource(self.sock.fileno(), self.chunk)
        )
        if self.request.chunked:
            return ChunkedBody(self.conn, client, self.body_read, self.chunk)
        return LengthBody(self.conn, client, self.body_read, self.request.content_length or 0)

    def _body_ended(self, end: End) -> None:
        if end is End.SOURCE_EOF:
            self.body_done = True
        elif end is End.SOURCE_ERROR:  # cut short, broken, or over max_body: never an EOF for the child
            self.body_cut = True

    def _discard(self) -> End:
        """The child stopped reading: the rest of the body is read and dropped, to its end."""
        if self.splice_body:
            self.splice_body = False
        end = move(self._body(), Discard(), self.discarded, self.chunk)
        self._body_ended(end)
        return end

    def _failure(self, direction: str, end: End) -> str:
        failure = self.failure
        return failure.reason if failure else super()._failure(direction, end)

    # -- the response: child -> client -----------------------------------------------------

    def _out(self, child: Child) -> End:
        source = self._child_source(child, FdSource(child.stdout, self.chunk))
        response = self.response
        try:
            if self.http.output == "nph":  # the child's own status line and head: passed on, then the FIN
                response.pass_through()
                return move(source, response, self.outbound, self.chunk)
            first = self._first_output(source, self.http.output)
            if first is None:
                source.close()
                return End.SOURCE_EOF  # no head: close() answers for the child
            head, rest = first
            if (
                head.length is None
                and head.status not in NO_BODY
                and not response.trailers
                and self.request.method != "HEAD"
            ):
                rest, ended = self._read_ahead(child, source, rest)  # (a HEAD's length is GET's: unknown here)
                if ended:  # the whole body is here: a short response goes with its length, not chunked
                    head = with_length(head, len(rest))
            response.begin(head)  # sent with the body's first bytes when they came with it: one send
            if rest and not response.dropping:
                response.write(rest)
                self.outbound.moved(len(rest))
            else:
                response.flush()
            end = move(source, response, self.outbound, self.chunk)
        except BadHead as e:
            source.close()
            self.broke = Failure("bad_gateway", str(e))
            return End.SOURCE_ERROR
        except OSError:  # the client went away while the head went out, or its first bytes broke the framing
            source.close()
            return End.SINK_CLOSED
        if end is End.SOURCE_EOF and response.writer is not None and response.writer.short():
            return End.SOURCE_ERROR
        return end

    def _read_ahead(self, child: Child, source: Source, rest: bytes) -> tuple[bytes, bool]:
        """One more read of the child's output if it would not wait: what it added, and whether
        the output ended there (it is then `rest` whole)."""
        poller = select.poll()
        poller.register(child.stdout, select.POLLIN)
        if not poller.poll(0):
            return rest, False
        more = bytes(source.read(self.chunk))
        source.done()
        return rest + more, not more

    def _first_output(self, source: Source, output: str) -> tuple[Head, bytes] | None:
        """The child's header block (cgi) or first bytes (body), None at its EOF before one."""
        block = bytearray()
        while True:
            data = source.read(self.chunk)
            block += data
            source.done()
            if not data:
                if output == "body" or not block:
                    return None
                raise BadHead("the output ended inside the header block")
            if output == "body":
                return Head(200, "OK", ((b"Content-Type", self.http.content_type.encode()),), None), bytes(block)
            end = block_end(block)
            if end:
                return parse_block(bytes(block[:end])), bytes(block[end:])
            if len(block) > MAX_BLOCK:
                raise BadHead(f"no end of the header block within {MAX_BLOCK // 1024} KiB")

    # -- the end ---------------------------------------------------------------------------

    def close_at_once(self, closing: Closing) -> None:
        """The command could not start (from the accept loop: nothing waits): a 502 if the
        socket takes it at once, then the connection ends."""
        status, text, fields = failure_status(closing.reason, None, None)
        self.response.status = status
        with contextlib.suppress(OSError):
            self.sock.send(short_response(status, text, self.request.version, self.request.method == "HEAD", fields),
                           stdsocket.MSG_DONTWAIT)  # fmt: skip
            self.sock.shutdown(stdsocket.SHUT_WR)
        self.sock.close()

    def close(self, closing: Closing) -> None:
        """A clean end finishes the response's framing (the held byte, the last chunk and the
        exit as a trailer) and keeps the connection when it can; a response that never began
        gets gsrv's status; anything else is a reset."""
        self.conn.served += 1
        response = self.response
        if closing.reason == "client_reset" or self.conn.stream.torn:
            reset(self.sock)
            return
        try:
            if not response.began:
                self._answer_for_child(closing)
            elif not closing.clean:
                reset(self.sock)
                return
            else:
                response.end(closing.exit_code)
        except OSError:
            reset(self.sock)
            return
        if response.keeps and self.body_done:
            self.kept_alive = True
            return
        if self.conn.secure:
            self.conn.stream.close_notify()
        fin_and_linger(self.sock)

    def _answer_for_child(self, closing: Closing) -> None:
        """No head went out: an empty 200 for a body that ended well with no output, else a
        status of gsrv's own with the child's exit (and the connection ends)."""
        response = self.response
        if self.http.output == "body" and closing.clean and self.output_eof:
            response.begin(Head(200, "OK", ((b"Content-Type", self.http.content_type.encode()),
                                            (b"Content-Length", b"0")), 0))  # fmt: skip
            response.end(closing.exit_code)
            return
        failure = self.failure
        status, text, fields = failure_status(failure.reason if failure else closing.reason, closing.exit_code,
                                              closing.signal)  # fmt: skip
        error = failure.error if failure else text
        response.own(status, short_response(status, error, self.request.version, self.request.method == "HEAD", fields))
