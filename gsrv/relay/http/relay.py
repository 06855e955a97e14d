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
next request (`kept`).
"""

from __future__ import annotations

import contextlib
import socket as stdsocket

import h11
from gevent.socket import socket

from gsrv.config.http import HttpConfig
from gsrv.edge.http import HttpConnection
from gsrv.edge.httphead import answer
from gsrv.edge.refusal import reset
from gsrv.loop import WRITE
from gsrv.relay.child import Child
from gsrv.relay.childend import Pipes
from gsrv.relay.http.cgi import EXIT_FIELD, MAX_BLOCK, BadHead, Head, block_end, failure_status, head_bytes, parse_block
from gsrv.relay.pump import Discard, End, Fd, FdSource, Meter, Source, move, splice
from gsrv.relay.relays import Closing, PipeRelay, RelayEvents, TlsSource, fin_and_linger

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_BODY = (204, 304)


class Cut(OSError):
    """The request body ended before its framing said (or broke it): never a clean EOF."""


class Broken(OSError):
    """The body or the output broke a rule (relay.failure says which): the direction stops."""


class HttpRelay(PipeRelay):
    """One request: its body to the child, the child's output as its response."""

    __slots__ = ("conn", "http", "request", "splice_body", "failure", "error", "status", "framing", "sent", "length",
                 "held", "body_read", "body_done", "cut_input", "kept", "close_after", "head_sent",
                 "unsent")  # fmt: skip

    def __init__(self, sock: socket, chunk: int, conn: HttpConnection, http: HttpConfig, splice_body: bool) -> None:
        super().__init__(sock, chunk, Pipes())
        assert conn.request is not None
        self.conn, self.http, self.request = conn, http, conn.request
        self.splice_body = splice_body and conn.request.content_length is not None
        self.failure: str | None = None  # bad_gateway, body_too_large: the reason a direction stopped with
        self.error: str | None = None
        self.status: int | None = None  # the status sent
        self.framing = ""  # "length", "chunked", "close" (until the FIN), "none" (no body)
        self.sent = 0  # body bytes sent
        self.length: int | None = None  # the response's Content-Length
        self.held = b""  # the response's last byte, until the child's exit is known
        self.body_read = 0  # request body bytes taken from the client (to the child or dropped)
        self.body_done = not self.request.has_body  # the request body's framing was read to its end
        self.cut_input = False  # the body was cut short: the child must not see its stdin end first
        self.kept = False  # the connection stays for the next request
        self.close_after = self._must_close()
        self.head_sent = False
        self.unsent = b""  # the head, until the body's first bytes go out with it

    @property
    def name(self) -> str:
        return "splice" if self.splice_body else "copy"

    def _must_close(self) -> bool:
        http, conn = self.http, self.conn
        return self.request.wants_close or not http.between_requests or conn.served + 1 >= http.max_requests

    def log_fields(self) -> dict[str, object]:
        return {"method": self.request.method, "path": self.request.path, "status": self.status,
                **super().log_fields(), "error": self.error}  # fmt: skip

    def start(self, child: Child, events: RelayEvents) -> None:
        if self.request.expects_continue and not self.body_done and not self.conn.buffered:
            with contextlib.suppress(OSError):  # a client gone: its body's read says so
                self._send(CONTINUE)  # the child runs: the client may send its body
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
        self.body_read = len(first)
        sink = Fd(child.stdin, WRITE)
        try:
            sink.write_all(first)
        except OSError:
            return End.SINK_CLOSED
        finally:
            sink.close()
        self.inbound.moved(len(first))
        end = splice(self.sock.fileno(), child.stdin, self.inbound, True, length - len(first))
        self.body_read = self.inbound.total
        if end is End.SOURCE_EOF and self.body_read < length:
            self.cut_input, end = True, End.SOURCE_ERROR
        self._body_ended(end)
        return end

    def _body(self) -> Source:
        if self.request.chunked:
            return ChunkedBody(self, self._client())
        return LengthBody(self, self._client(), self.request.content_length or 0)

    def _client(self) -> Source:
        tls = self.conn.secure
        return TlsSource(self.conn.stream) if tls else FdSource(self.sock.fileno(), self.chunk)  # type: ignore[arg-type]

    def _body_ended(self, end: End) -> None:
        if end is End.SOURCE_EOF:
            self.body_done = True
        elif end is End.SOURCE_ERROR:  # cut short, broken, or over max_body: never an EOF for the child
            self.cut_input = True

    def _discard(self) -> End:
        """The child stopped reading: the rest of the body is read and dropped, to its end."""
        if self.splice_body:
            self.splice_body = False
        end = move(self._body(), Discard(), self.discarded, self.chunk)
        self._body_ended(end)
        return end

    def _failure(self, direction: str, end: End) -> str:
        return self.failure or super()._failure(direction, end)

    # -- the response: child -> client -----------------------------------------------------

    def _out(self, child: Child) -> End:
        source = self._child_source(child, FdSource(child.stdout, self.chunk))
        output = self.http.output
        try:
            if output == "nph":  # the child's own status line and head: passed on, then the FIN
                self.framing, self.close_after = "close", True
                return move(source, ResponseBody(self), self.outbound, self.chunk)
            first = self._first_output(source, output)
            if first is None:
                source.close()
                return End.SOURCE_EOF  # no head: close() answers for the child
            head, rest = first
            self._send_head(head)  # with the body's first bytes when they came with it: one send
            if rest and not self.drops_body:
                ResponseBody(self).write(rest)
                self.outbound.moved(len(rest))
            elif self.unsent:
                self._send(b"")
            end = move(source, ResponseBody(self), self.outbound, self.chunk)
        except BadHead as e:
            source.close()
            self.failure, self.error = "bad_gateway", str(e)
            return End.SOURCE_ERROR
        except OSError:  # the client went away while the head went out
            source.close()
            return End.SINK_CLOSED
        written = self.sent + len(self.held)
        if end is End.SOURCE_EOF and self.framing == "length" and not self.drops_body and written != self.length:
            self.failure = "bad_gateway"
            self.error = f"the command wrote {written} of its Content-Length {self.length}"
            return End.SOURCE_ERROR
        return end

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

    def _send_head(self, head: Head) -> None:
        version = self.request.version
        if head.status in NO_BODY or self.request.method == "HEAD":
            self.framing = "none" if head.length is None else "length"
        elif head.length is not None:
            self.framing = "length"
        elif version == "1.1":
            self.framing = "chunked"
        else:
            self.framing, self.close_after = "close", True
        self.length = head.length
        self.status = head.status
        data = head_bytes(version, head, self.framing, self.close_after, self.request.takes_trailers)
        if self.framing == "none" or self.request.method == "HEAD" or head.status in NO_BODY or head.length == 0:
            data, self.held = data[:-1], data[-1:]  # complete at its head: the last byte waits for the exit
        self.head_sent, self.unsent = True, data

    def _send(self, data: bytes | memoryview) -> float:
        if self.unsent:
            data, self.unsent = self.unsent + data, b""
        return self.conn.stream.send(data)

    @property
    def drops_body(self) -> bool:
        return self.request.method == "HEAD" or self.framing == "none"

    # -- the end ---------------------------------------------------------------------------

    def close_at_once(self, closing: Closing) -> None:
        """The command could not start (from the accept loop: nothing waits): a 502 if the
        socket takes it at once, then the connection ends."""
        status, text, fields = failure_status(closing.reason, None, None)
        self.status = status
        with contextlib.suppress(OSError):
            self.sock.send(answer(status, text, self.request.version, self.request.method == "HEAD", fields),
                           stdsocket.MSG_DONTWAIT)  # fmt: skip
            self.sock.shutdown(stdsocket.SHUT_WR)
        self.sock.close()

    def close(self, closing: Closing) -> None:
        """A clean end finishes the response's framing (the held byte, the last chunk and the
        exit as a trailer) and keeps the connection when it can; a response that never began
        gets gsrv's status; anything else is a reset."""
        self.conn.served += 1
        stream = self.conn.stream
        if closing.reason == "client_reset" or stream.torn:
            self._reset()
            return
        try:
            if not self.head_sent:
                self._answer_for_child(closing)
            elif not closing.clean:
                self._reset()
                return
            elif self.framing == "chunked":
                trailer = f"{EXIT_FIELD}: {closing.exit_code}\r\n" if self.request.takes_trailers else ""
                self._send(f"0\r\n{trailer}\r\n".encode())
            elif self.held:
                self._send(self.held)
        except OSError:
            self._reset()
            return
        self.conn.status = self.status
        if not self.close_after and self.body_done and self.framing in ("length", "chunked", "none"):
            self.kept = True
            return
        self._finish()

    def _answer_for_child(self, closing: Closing) -> None:
        """No head went out: an empty 200 for a body that ended well with no output, else a
        status of gsrv's own with the child's exit (and the connection ends)."""
        if self.http.output == "body" and closing.clean and self.output_eof:
            self._send_head(Head(200, "OK", ((b"Content-Type", self.http.content_type.encode()),
                                             (b"Content-Length", b"0")), 0))  # fmt: skip
            self._send(self.held)
            return
        status, text, fields = failure_status(self.failure or closing.reason, closing.exit_code, closing.signal)
        self.status, self.close_after = status, True
        self._send(answer(status, self.error or text, self.request.version, self.request.method == "HEAD", fields))

    def _finish(self) -> None:
        """FIN after the response, then the client's input read and dropped (a lingering close)."""
        if self.conn.secure:
            self.conn.stream.close_notify()
        fin_and_linger(self.sock)

    def _reset(self) -> None:
        reset(self.sock)


class LengthBody:
    """A Content-Length body: what was read with the head first, then the client, to its length."""

    __slots__ = ("relay", "client", "left")

    def __init__(self, relay: HttpRelay, client: Source, length: int) -> None:
        self.relay, self.client = relay, client
        self.left = length - relay.body_read

    def read(self, limit: int) -> memoryview | bytes:
        if self.left <= 0:
            return b""
        data = self.relay.conn.take(min(limit, self.left)) or self.client.read(min(limit, self.left))
        if not data:
            raise Cut("the client ended before its Content-Length")
        self.left -= len(data)
        self.relay.body_read += len(data)
        return data

    def done(self) -> None:
        self.client.done()

    def close(self) -> None:
        self.client.close()


class ChunkedBody:
    """A chunked body, de-chunked by the request's h11 parser; max_body counts it."""

    __slots__ = ("relay", "client", "parser")

    def __init__(self, relay: HttpRelay, client: Source) -> None:
        self.relay, self.client = relay, client
        assert relay.conn.parser is not None
        self.parser: h11.Connection = relay.conn.parser

    def read(self, limit: int) -> bytes:
        parser, relay = self.parser, self.relay
        if relay.conn.buffered:
            parser.receive_data(relay.conn.take(len(relay.conn.buffered)))
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as e:
                raise Cut(f"the chunked body is malformed: {e}") from None
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                relay.body_read += len(data)
                if relay.http.max_body and relay.body_read > relay.http.max_body:
                    relay.failure = "body_too_large"
                    relay.error = f"the chunked body is over max_body ({relay.http.max_body})"
                    raise Broken(relay.error)
                return data
            if isinstance(event, h11.EndOfMessage):
                relay.conn.buffered = bytes(parser.trailing_data[0])
                return b""
            more = self.client.read(self.relay.chunk)
            if not more:
                raise Cut("the client ended before the chunked body's last chunk")
            parser.receive_data(bytes(more))
            self.client.done()

    def done(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()


class ResponseBody:
    """The child's output as the response body, in its framing; dropped for HEAD and 204/304."""

    __slots__ = ("relay",)

    def __init__(self, relay: HttpRelay) -> None:
        self.relay = relay

    @property
    def dropping(self) -> bool:
        return self.relay.drops_body

    def room(self, meter: Meter, chunk: int) -> int:
        return chunk

    def write(self, data: memoryview | bytes) -> float:
        relay = self.relay
        n = len(data)
        if relay.framing == "chunked":
            relay.sent += n
            return relay._send(b"".join((b"%x\r\n" % n, data, b"\r\n")))  # one copy of the chunk
        if relay.framing == "length":
            assert relay.length is not None
            left = relay.length - relay.sent
            if n > left:
                relay.failure = "bad_gateway"
                relay.error = f"the command wrote more than its Content-Length {relay.length}"
                raise Broken(relay.error)
            if n == left:  # the response would be complete: its last byte waits for the exit
                data, relay.held = data[:-1], bytes(data[-1:])
                n -= 1
        if not relay.head_sent:  # nph: the child's status line, for the log
            relay.head_sent = True
            status = bytes(data[9:12])
            relay.status = int(status) if bytes(data[:5]) == b"HTTP/" and status.isdigit() else None
        relay.sent += n
        return relay._send(data) if n else 0.0

    def close(self) -> None:
        pass
