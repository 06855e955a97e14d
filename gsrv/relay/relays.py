"""How a session's bytes travel between its client and its child: the relay interface (the
`Relay` protocol), the base of the relays that pump (`PipeRelay`, the copy relay), and its
splice and TLS variants, one chosen when the session starts.

A relay runs both directions in tasks of their own (gsrv/workers.py) and leaves the facts a session's end
rules need (relay/ending.py): bytes each way, last activity, time blocked (the meters), the
client's EOF, the output's EOF, a failure (reported through `RelayEvents.abort`). It also
owns how the connection closes: a FIN after all output, then a lingering read so that
close() sends no reset, or a reset.
"""

from __future__ import annotations

import socket as stdsocket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gevent.socket import socket

from gsrv.edge.hello import Declined, Hello
from gsrv.edge.refusal import reset
from gsrv.edge.tls import TlsStream
from gsrv.relay import kernel
from gsrv.relay.child import Child
from gsrv.relay.childend import Pipes, PtyEnd
from gsrv.relay.ending import FAILURES
from gsrv.relay.linger import fin_and_linger
from gsrv.relay.pump import (
    Discard,
    End,
    FdSink,
    FdSource,
    Meter,
    Sink,
    Source,
    move,
    queued,
    splice,
)
from gsrv.relay.record import RecordedSink, RecordedSource, Recording
from gsrv.relay.stdio import Stdio
from gsrv.workers import WORKERS, Task

if TYPE_CHECKING:
    from gsrv.relay.ws.reattach import Link  # a terminal page's connection: only the WebSocket relay takes one


@dataclass(frozen=True)
class Closing:
    """How a session ended, as its connection's close needs it: the reason, FIN or reset (the
    end rules' verdict), and the child's status (a WebSocket's close frame reports it);
    `drop`: nonzero_exit = "reset" and the child ended badly (no close frame, a reset)."""

    reason: str
    clean: bool
    exit_code: int | None = None
    signal: str | None = None
    drop: bool = False


class RelayEvents(Protocol):
    """What a relay tells its session."""

    def abort(self, reason: str) -> None: ...  # a direction failed: end with this reason (a reset)
    def changed(self) -> None: ...  # a fact changed: decide again
    def bug(self, error: Exception) -> None: ...  # a direction raised: end as internal_error
    def note(self, event: str, **fields: object) -> None: ...  # a log line of the session's (a reattach)


class Relay(Protocol):
    """What a session reads of its relay (trio's Stream is the model: the session needs no
    more): the facts for its end rules, the child's stdio, the start and stop of the
    directions, and the connection's close."""

    closes_after_stop: bool  # the stop ladder runs before the connection closes (socket handoff)
    kept_alive: bool  # after close(): the connection stays open for its next request (HTTP keep-alive)
    input_done: bool  # the client's EOF reached the child
    output_eof: bool  # the child's output reached its end, and all of it the client
    tasks: list[Task]  # its directions' (and a WebSocket's stderr and pings)

    @property
    def name(self) -> str: ...  # how bytes move, for the log's relay=
    @property
    def cut_input(self) -> bool: ...  # the client's input was cut short: the child is signalled before its stdin closes
    @property
    def hung_up(self) -> bool: ...  # gsrv hung up the child's terminal
    @property
    def detached_since(self) -> float | None: ...  # reattach: the client's connection dropped then, none since
    @property
    def http_status(self) -> int | None: ...  # the status an HTTP client got (None: no HTTP, none sent)
    @property
    def tokens(self) -> tuple[str, ...]: ...  # what a terminal page's hello may name the session by
    def join(self, link: Link, hello: Hello, same_user: bool) -> None: ...  # such a hello: raises Declined
    def stdio(self, stderr: str) -> Stdio: ...
    def meters(self) -> list[tuple[str, Meter]]: ...
    def last_activity(self) -> float: ...
    def output_in_flight(self, stdout: int) -> bool: ...
    def sample(self, child: Child) -> None: ...  # the facts brought up to date before the rules read them
    def peer_is_dead(self) -> bool: ...  # the watchdog's check
    def log_fields(self) -> dict[str, object]: ...
    def start(self, child: Child, events: RelayEvents) -> None: ...
    def stop(self) -> None: ...
    def close_at_once(self, closing: Closing) -> None: ...  # a session that never ran, from the accept loop
    def close(self, closing: Closing) -> None: ...


class RelayDefaults:
    """The Relay protocol's answers where a relay has nothing of its own to say: no HTTP status,
    no tokens, nobody joins (the HTTP relay gives its status; the WebSocket relay its tokens,
    and it takes a reattaching page or a watcher)."""

    __slots__ = ()

    @property
    def http_status(self) -> int | None:
        return None

    @property
    def tokens(self) -> tuple[str, ...]:
        return ()

    def join(self, link: Link, hello: Hello, same_user: bool) -> None:
        raise Declined("no_session", "that session takes no other connection")


class PipeRelay(RelayDefaults):
    """The copy relay, and the base of the relays that pump the child's pipes or terminal
    (splice, TLS, WebSocket, HTTP): each direction in a greenlet, through one pooled buffer.

    Its client side is the socket (TLS: TlsRelay); its child side (`child_end`) the child's
    pipes or its terminal (relay/childend.py). A subclass changes how a direction moves (`_in`,
    `_out`, `_discard`) or what the client is told before the FIN (`_finish_output`); the
    session sees only the Relay protocol."""

    closes_after_stop = False
    kept_alive = False
    __slots__ = ("sock", "chunk", "child_end", "inbound", "outbound", "discarded", "input_done", "client_eof",
                 "output_eof", "tasks", "recording", "phase_in", "phase_out")  # fmt: skip

    def __init__(self, sock: socket, chunk: int, child_end: Pipes | PtyEnd | None = None) -> None:
        self.sock, self.chunk = sock, chunk
        self.child_end = child_end or Pipes()
        self.inbound, self.outbound, self.discarded = Meter(), Meter(), Meter()
        self.input_done = False  # the client's EOF reached the child (a closed stdin, a terminal's EOF)
        self.client_eof = False  # the client finished sending (to the child, or discarded)
        self.output_eof = False  # the child's output reached its end and all of it the client
        self.tasks: list[Task] = []
        self.recording: Recording | None = None  # record = DIR: the child's bytes as an asciicast file
        # Where each direction is, so an upgrade's new code starts only those still running:
        # "relay", "discard" (in: the child stopped reading, the client's bytes are dropped), "done"
        self.phase_in = self.phase_out = "relay"

    @property
    def name(self) -> str:
        """How bytes move, for the log's relay=: copy, or pty (copy through a terminal)."""
        return self.child_end.name

    # -- what a session reads -----------------------------------------------------------

    def meters(self) -> list[tuple[str, Meter]]:
        return [("in", self.inbound), ("out", self.outbound)]

    def last_activity(self) -> float:
        return max(self.inbound.last, self.outbound.last, self.discarded.last)

    @property
    def cut_input(self) -> bool:
        """The client's input did not reach its end (a reset, a TLS close without close_notify,
        a WebSocket message left open by a close frame, a timeout): the child is signalled
        before its stdin closes, so it never takes what it got for the whole input."""
        return not self.input_done

    @property
    def hung_up(self) -> bool:
        """gsrv hung up the child's terminal (its input ended in raw mode, the child ran on)."""
        return self.child_end.hung_up

    @property
    def detached_since(self) -> float | None:
        """Its client's connection is the session's (reattach is WebSocketRelay's)."""
        return None

    def output_in_flight(self, stdout: int) -> bool:
        """Output bytes held by the relay or waiting in the child's stdout pipe (or terminal)."""
        return self.outbound.holding or bool(queued(stdout))

    def stdio(self, stderr: str) -> Stdio:
        """The child's stdio, made by the relay's child end (pipes, or a pty); stderr: the key."""
        return self.child_end.stdio(stderr)

    def sample(self, child: Child) -> None:
        """Bring the facts up to date before the end rules read them (the directions keep them so)."""

    def peer_is_dead(self) -> bool:
        """The watchdog's check: the kernel closed the connection (a reset) but no direction noticed."""
        sock = self.sock
        try:
            tcp = sock.family in (stdsocket.AF_INET, stdsocket.AF_INET6)
            state = sock.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_INFO, 8)[0] if tcp else 0
            error = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ERROR)
        except OSError:
            return True
        return bool(state == kernel.CLOSE or error != 0)

    def log_fields(self) -> dict[str, object]:
        return {"bytes_in": self.inbound.total, "bytes_out": self.outbound.total,
                "discarded": self.discarded.total or None,
                **(self.recording.log_fields() if self.recording else {})}  # fmt: skip

    # -- running ------------------------------------------------------------------------

    def start(self, child: Child, events: RelayEvents) -> None:
        """Both directions, each in a task of its own; a bug in one ends the session. (A relay an
        upgrade moved starts only the directions that had not ended.)"""
        running = [d for d, phase in ((self._up, self.phase_in), (self._down, self.phase_out)) if phase != "done"]
        self.tasks = [WORKERS.start(guarded, direction, child, events) for direction in running]

    def stop(self) -> None:
        for task in self.tasks:
            task.kill()
        if self.recording is not None:
            self.recording.close()  # what is queued is written, off the loop

    def close_at_once(self, closing: Closing) -> None:
        """A session that never ran (its command could not start), from the accept loop: a reset."""
        reset(self.sock)

    def close(self, closing: Closing) -> None:
        """The end of the connection: clean, a FIN after all output, then the client's input
        read and dropped until its EOF or LINGER_S after it last acknowledged reply bytes
        (unread input at close() would make the kernel reset the connection and discard
        reply bytes still queued for the client); else a reset."""
        if not closing.clean:
            reset(self.sock)
            return
        self._finish_output(closing)
        fin_and_linger(self.sock, not self.client_eof)

    # -- the directions -----------------------------------------------------------------

    def _up(self, child: Child, events: RelayEvents) -> None:
        try:
            end = self._in(child) if self.phase_in == "relay" else End.SINK_CLOSED
            if end is End.SOURCE_EOF:
                self.client_eof = True
                self.child_end.end_input(child)  # a terminal in raw mode may wait here (eof_grace)
                self.input_done = True
            elif end is End.SINK_CLOSED:
                if self.phase_in == "relay":
                    self.child_end.stopped_reading(child)
                    self.phase_in = "discard"
                end = self._discard()
                self.client_eof = end is End.SOURCE_EOF
            if end is End.SOURCE_ERROR:
                events.abort(self._failure("in", end))
        finally:
            self.phase_in = "done"
        events.changed()

    def _down(self, child: Child, events: RelayEvents) -> None:
        try:
            end = self._out(child)
        finally:
            self.phase_out = "done"
        if end is End.SOURCE_EOF:
            self.output_eof = True
        else:
            events.abort(self._failure("out", end))
        events.changed()

    def _failure(self, direction: str, end: End) -> str:
        """The reason a direction that stopped abnormally ends its session with."""
        return FAILURES[(direction, end)]

    def _in(self, child: Child) -> End:
        return move(FdSource(self.sock.fileno(), self.chunk), self._child_sink(child), self.inbound, self.chunk)

    def _out(self, child: Child) -> End:
        return move(self._child_source(child), FdSink(self.sock.fileno()), self.outbound, self.chunk)

    def _child_sink(self, child: Child) -> Sink:
        """The child's input (recorded with record_input)."""
        sink = self.child_end.sink(child)
        return RecordedSink(sink, self.recording.input) if self.recording and self.recording.record_input else sink

    def _child_source(self, child: Child, source: Source | None = None) -> Source:
        """The child's output (recorded with record)."""
        source = source or self.child_end.source(child, self.chunk)
        return RecordedSource(source, self.recording.output) if self.recording else source

    def _discard(self) -> End:
        return move(FdSource(self.sock.fileno(), self.chunk), Discard(), self.discarded, self.chunk)

    def _finish_output(self, closing: Closing) -> None:
        """Before the FIN: nothing to say on a plain connection."""


def guarded(direction: Callable[[Child, RelayEvents], None], child: Child, events: RelayEvents) -> None:
    try:
        direction(child, events)
    except Exception as e:  # a bug ends its own session with a reset and a log line, never hangs it
        events.bug(e)


class SpliceRelay(PipeRelay):
    """Both directions with splice(2): the bytes stay in the kernel, gsrv holds no buffer."""

    name = "splice"
    __slots__ = ()

    def _in(self, child: Child) -> End:
        return splice(self.sock.fileno(), child.stdin, self.inbound, source_is_socket=True)

    def _out(self, child: Child) -> End:
        return splice(child.stdout, self.sock.fileno(), self.outbound, source_is_socket=False)


class TlsRelay(PipeRelay):
    """Plain bytes to and from the child, records to and from the client (edge/tls.py)."""

    __slots__ = ("stream",)  # the log's relay= says how bytes moved; TLS is logged on its own (tls=)

    def __init__(self, sock: socket, chunk: int, stream: TlsStream, child_end: Pipes | PtyEnd | None = None) -> None:
        super().__init__(sock, chunk, child_end)
        self.stream = stream

    def _in(self, child: Child) -> End:
        """SOURCE_EOF at the client's close_notify."""
        return move(TlsSource(self.stream), self._child_sink(child), self.inbound, self.chunk)

    def _out(self, child: Child) -> End:
        """After a TLS 1.2 client's close_notify (both ways closed) the child's output is read
        and dropped, so the child can finish."""
        return move(self._child_source(child), TlsSink(self.stream), self.outbound, self.chunk)

    def _finish_output(self, closing: Closing) -> None:
        self.stream.close_notify()


class TlsSource:
    """The client's plain bytes, decrypted (ssl.SSLError is an OSError: a failure)."""

    __slots__ = ("stream",)

    def __init__(self, stream: TlsStream) -> None:
        self.stream = stream

    def read(self, limit: int) -> bytes:
        return self.stream.recv(limit)

    def done(self) -> None:
        pass

    def close(self) -> None:
        pass


class TlsSink:
    """The child's output, encrypted to the client; dropped once our close_notify went out."""

    __slots__ = ("stream",)

    def __init__(self, stream: TlsStream) -> None:
        self.stream = stream

    @property
    def dropping(self) -> bool:
        return self.stream.closed

    def room(self, meter: Meter, chunk: int) -> int:
        return chunk

    def write(self, data: memoryview | bytes) -> float:
        return self.stream.send(data)

    def close(self) -> None:
        pass
