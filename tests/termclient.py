"""A client of the terminal page's gsrv-term protocol (edge/hello.py) for tests: raw sockets and
wsproto's frames, nothing of gsrv's; `term` opens them and closes them at the test's end."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode


class TermClient:
    """One connection in the gsrv-term protocol: the hello sent, "o" output gathered and
    acknowledged as a page does, gsrv's answer and close frame kept."""

    def __init__(self, server, name: str, hello: dict[str, object], headers: str = "") -> None:  # type: ignore[no-untyped-def]
        host, port = server.address(name)
        self.sock = socket.create_connection((host, port), timeout=20)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                          f"Sec-WebSocket-Protocol: gsrv-term\r\n{headers}\r\n".encode())  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 ") and b"Sec-WebSocket-Protocol: gsrv-term\r\n" in head, head
        self.proto = FrameProtocol(client=True, extensions=[])
        self.output = bytearray()
        self.answer: dict[str, object] | None = None
        self.closed: tuple[int, str] | None = None
        self.acked = 0
        self._kind: int | None = None  # the message in progress (its type byte)
        self._hello = b""
        self.send(b"h" + json.dumps(hello).encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.proto.send_data(data))

    def pump(self, until: Callable[[], bool], timeout: float = 20.0) -> None:
        """Read, acknowledge every 16 KiB (as the page does), until `until` or the close frame."""
        deadline = time.monotonic() + timeout
        while not until() and self.closed is None:
            assert time.monotonic() < deadline, (len(self.output), self.answer, self.closed)
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = self.sock.recv(65536)
            if not chunk:
                return
            self.proto.receive_bytes(chunk)
            for frame in self.proto.received_frames():
                if frame.opcode is Opcode.CLOSE:
                    self.closed = (int(frame.payload[0]), str(frame.payload[1]))
                    break
                if frame.opcode is Opcode.PING:
                    self.sock.sendall(self.proto.pong(frame.payload))
                    continue
                self._piece(bytes(frame.payload), frame.message_finished)
            if len(self.output) - self.acked >= 16384:
                self.acked = len(self.output)
                self.send(b"a%d" % self.acked)

    def _piece(self, payload: bytes, finished: bool) -> None:
        if self._kind is None and payload:
            self._kind, payload = payload[0], payload[1:]
        if self._kind == ord("o"):
            self.output += payload
        elif self._kind == ord("h"):
            self._hello += payload
            if finished:
                self.answer, self._hello = json.loads(self._hello), b""
        if finished:
            self._kind = None

    def drop(self) -> None:
        """The connection ends without a close frame (a laptop's sleep, a Wi-Fi change)."""
        self.sock.close()


@pytest.fixture
def term() -> Iterator[Callable[..., TermClient]]:
    """TermClients, each closed at the test's end."""
    made: list[TermClient] = []

    def open_one(*args: object, **kwargs: object) -> TermClient:
        made.append(TermClient(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield open_one
    for client in made:
        client.sock.close()


def answered(client: TermClient) -> dict[str, object]:
    client.pump(lambda: client.answer is not None)
    assert client.answer is not None, client.closed
    return client.answer
