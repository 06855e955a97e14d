"""Socket handoff (`relay = "socket"`): the child gets the connection itself as its stdin
and stdout, as under inetd and tcpserver, so programs that need a socket (`rsync --daemon`,
`getpeername(0)`, `shutdown(1, SHUT_WR)`) work, and the bytes move at the kernel's speed.

gsrv moves no bytes. It keeps its own reference to the socket so that it, not the child,
decides how the connection ends (after the stop ladder: while another process holds the
socket a close resets nothing), and reads what it no longer sees from the kernel
(relay/kernel.py): bytes each way, last activity, the client's FIN, a reset.
"""

from __future__ import annotations

import os
import socket as stdsocket
import termios
import time

from gevent.socket import socket

from gsrv.edge.refusal import reset
from gsrv.relay import kernel
from gsrv.relay.child import Child
from gsrv.relay.ending import POLL_S
from gsrv.relay.linger import linger
from gsrv.relay.pump import Meter, queued
from gsrv.relay.relays import Closing, RelayDefaults, RelayEvents
from gsrv.relay.stdio import Stdio
from gsrv.workers import Task


class SocketRelay(RelayDefaults):
    """The child holds the connection; the facts come from the kernel when sampled (a Relay,
    relay/relays.py, that runs no greenlet and moves no byte)."""

    name = "socket"
    closes_after_stop = True  # the ladder first: nothing of the group may still hold the socket
    kept_alive = False
    cut_input = False
    hung_up = False  # no terminal
    __slots__ = ("sock", "fd", "header_length", "inbound", "outbound", "rwnd", "events", "reset_seen", "held", "tcp",
                 "input_done", "client_eof", "output_eof", "tasks")  # fmt: skip

    @property
    def detached_since(self) -> float | None:
        return None  # the child holds the connection

    def __init__(self, sock: socket, header_length: int) -> None:
        self.sock = sock
        self.inbound, self.outbound = Meter(), Meter()
        self.input_done = False  # the client's FIN (TCP_INFO's state; a unix socket: POLLRDHUP)
        self.client_eof = False
        self.output_eof = False  # the child exited and its group is gone
        self.tasks: list[Task] = []  # none: the child moves the bytes
        self.fd: int = sock.fileno()
        self.header_length = header_length  # the PROXY header's bytes: received, but never the child's
        self.rwnd = Meter()  # its `blocked`: time the client's receive window limited sending
        self.events: RelayEvents | None = None
        self.reset_seen = False
        self.held = False  # a process outside the group still held the connection at the end
        self.tcp = sock.family in (stdsocket.AF_INET, stdsocket.AF_INET6)  # else unix: no TCP_INFO

    # -- what a session reads -----------------------------------------------------------

    def stdio(self, stderr: str) -> Stdio:
        """The connection itself as the child's stdin and stdout."""
        return Stdio.connection(self.fd, stderr)

    def meters(self) -> list[tuple[str, Meter]]:
        """The kernel's figures (a unix socket has none: nothing is counted, never a made-up 0)."""
        if not self.tcp:
            return []
        if self.sock.fileno() >= 0:  # once closed, the figures read just before the close
            self._read_figures()
        return [("in", self.inbound), ("out", self.outbound), ("rwnd", self.rwnd)]

    def sample(self, child: Child) -> None:
        """Facts from the kernel: the client's FIN (input done), a reset, the group's end (output done)."""
        self._read_figures()
        if not self.tcp and kernel.poll_flags(self.fd) & kernel.INPUT_ENDED:
            self.input_done = self.client_eof = True
        self.output_eof = child.exited.is_set() and not child.group_alive()
        if self.reset_seen and self.events is not None:
            self.events.abort("client_reset")

    def last_activity(self) -> float:
        return max(self.inbound.last, self.outbound.last)

    def output_in_flight(self, stdout: int) -> bool:
        """A grandchild still moving bytes, or reply bytes not yet sent."""
        return time.monotonic() - self.last_activity() < 2 * POLL_S or bool(queued(self.fd, termios.TIOCOUTQ))

    def peer_is_dead(self) -> bool:
        """A reset (or a keepalive timeout): TCP_CLOSE with poll()'s POLLERR, which unlike
        SO_ERROR leaves the error for the child's own read, or with our FIN unacknowledged."""
        self._read_figures()
        return self.reset_seen

    def log_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {}
        if self.tcp:
            fields = {"bytes_in": self.inbound.total, "bytes_out": self.outbound.total}
        if self.held:
            fields["socket_held"] = 1
        return fields

    def _read_figures(self, outgoing: bool = True) -> None:
        """bytes_in: what arrived from the client (less a PROXY header and its FIN);
        bytes_out: what the child wrote (acknowledged or still queued, less a FIN)."""
        figures = kernel.figures_of(self.sock) if self.tcp else None
        if figures is None:
            return
        if figures.reset(bool(kernel.poll_flags(self.fd) & kernel.ERROR)):
            self.reset_seen = True
        elif figures.fin_received:
            self.input_done = self.client_eof = True
        now = time.monotonic()
        self.inbound.total = max(0, figures.received - self.header_length - int(self.input_done))
        self.inbound.last = now - figures.last_received_s
        if outgoing:
            self.outbound.total = figures.written
            self.outbound.last = now - figures.last_sent_s
            self.rwnd.blocked = figures.rwnd_limited_s

    # -- running ------------------------------------------------------------------------

    def start(self, child: Child, events: RelayEvents) -> None:
        self.events = events  # no greenlets: the child moves the bytes

    def stop(self) -> None:
        """Nothing runs."""

    def close_at_once(self, closing: Closing) -> None:
        """Its child never started: a reset (the connection was never the child's)."""
        reset(self.sock)

    def close(self, closing: Closing) -> None:
        """After the stop ladder. Clean: a FIN (shutdown acts on the connection, whoever else
        holds it), the lingering read (also after the client's FIN while input the child left
        unread is queued: closing over it would reset the reply), the figures, close. Else
        the figures, then a reset of the connection itself (a unix socket has none: both
        ways shut), then close."""
        try:
            os.set_blocking(self.fd, False)  # the group is gone: the socket is gsrv's again
            if self.tcp:
                self._read_figures()  # before our FIN joins the send queue
            if closing.clean:
                self.sock.shutdown(stdsocket.SHUT_WR)
                if not self.client_eof or queued(self.fd):
                    linger(self.fd)
                    if self.tcp:
                        self._read_figures(outgoing=False)  # what the client sent while we lingered
            elif self.tcp:
                kernel.disconnect(self.fd)
            else:
                self.sock.shutdown(stdsocket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            self.held = kernel.close_and_see_held(self.sock)
