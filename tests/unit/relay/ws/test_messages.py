"""The WebSocket message layer without a socket (relay/ws/messages.py over the client's end,
relay/ws/client.py): the client's frames made by an independent library (wsproto, as a client)
and fed a few bytes a read by a fake stream; what gsrv sends read back by wsproto."""

from __future__ import annotations

import dataclasses

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from gsrv.config.web import WebSocketConfig
from gsrv.edge.wsframes import FrameReader
from gsrv.relay.ws.client import WsClient
from gsrv.relay.ws.messages import Frames, Messages
from gsrv.relay.ws.window import Window

TEXT = dataclasses.replace(WebSocketConfig(), max_message=1024)  # (the parser makes 0 the chunk size)


class FakeStream:
    """A connection whose reads return `raw` a few bytes at a time, then its end (b"")."""

    closed = torn = False

    def __init__(self, raw: bytes = b"", piece: int = 3) -> None:
        self.reads = [raw[at : at + piece] for at in range(0, len(raw), piece)]
        self.sent = bytearray()

    def recv(self, size: int) -> bytes:
        return self.reads.pop(0)[:size] if self.reads else b""

    def send(self, data: bytes | bytearray | memoryview) -> float:
        self.sent += data
        return 0.0

    def close_notify(self) -> None:
        self.closed = True


def client_of(raw: bytes = b"") -> tuple[WsClient, FakeStream]:
    stream = FakeStream(raw)
    return WsClient(stream, FrameReader(), b"", 65536, Window(256 * 1024)), stream


def sent_frames(stream: FakeStream) -> list[tuple[Opcode, bytes]]:
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(bytes(stream.sent))
    return [(f.opcode, bytes(f.payload) if isinstance(f.payload, bytes | bytearray) else f.payload)
            for f in reader.received_frames()]  # fmt: skip


def read_all(frames: Frames) -> bytes:
    got = b""
    for _ in range(1000):
        data = frames.read(65536)
        if not data:
            return got
        got += data
    raise AssertionError("no end after 1000 reads")


def test_a_text_message_in_pieces_reaches_the_child_as_a_line_and_a_ping_between_them_is_answered() -> None:
    proto = FrameProtocol(client=True, extensions=[])
    raw = proto.send_data("hél", fin=False) + proto.ping(b"p1") + proto.send_data("lo", fin=True) + proto.close(1000)
    client, stream = client_of(bytes(raw))
    assert read_all(Frames(client, typed=False, text=True)) == "héllo\n".encode()
    assert sent_frames(stream) == [(Opcode.PONG, b"p1")]
    assert client.failure is None


def test_typed_messages_input_resize_and_acknowledgement() -> None:
    proto = FrameProtocol(client=True, extensions=[])
    raw = proto.send_data(b"ils\r") + proto.send_data(b"r120x40") + proto.send_data(b"a0") + proto.close(1000)
    client, _ = client_of(bytes(raw))
    resizes: list[tuple[int, int]] = []
    frames = Frames(client, typed=True, text=False, resized=lambda columns, rows: resizes.append((columns, rows)))
    assert read_all(frames) == b"ls\r"
    assert resizes == [(120, 40)]
    assert client.window.on  # the first acknowledgement turns the window on


@pytest.mark.parametrize(("message", "code"), [(b"xoops", 1003), (b"r120", 1008), (b"r" + b"9" * 40, 1008)])
def test_a_typed_message_that_breaks_the_rules_fails_the_session_with_its_close_code(message: bytes, code: int) -> None:
    proto = FrameProtocol(client=True, extensions=[])
    client, _ = client_of(bytes(proto.send_data(message)))
    with pytest.raises(OSError):
        read_all(Frames(client, typed=True, text=False))
    assert (client.failure, client.code) == ("protocol_error", code)


def test_a_connection_that_ends_without_a_close_frame_is_the_clients_reset() -> None:
    proto = FrameProtocol(client=True, extensions=[])
    client, _ = client_of(bytes(proto.send_data("a line")))
    frames, got = Frames(client, typed=False, text=True), b""
    with pytest.raises(OSError, match="without a close frame"):
        for _ in range(100):
            got += frames.read(65536)  # payload as it arrives, a few bytes a read
    assert (got, client.failure) == (b"a line\n", "client_reset")


def test_text_output_goes_out_a_line_a_message_its_last_line_at_the_flush() -> None:
    client, stream = client_of()
    out = Messages(client, TEXT, "o", typed=False)
    out.write(b"one\r\ntw")
    assert sent_frames(stream) == [(Opcode.TEXT, "one")]
    out.write(b"o\nthr")
    out.flush()
    assert sent_frames(stream) == [(Opcode.TEXT, "one"), (Opcode.TEXT, "two"), (Opcode.TEXT, "thr")]


def test_text_output_that_is_not_utf8_or_too_long_fails_with_its_code() -> None:
    client, _ = client_of()
    with pytest.raises(OSError, match="not UTF-8"):
        Messages(client, TEXT, "o", typed=False).write(b"\xff\n")
    assert (client.failure, client.code) == ("invalid_text", 1007)
    client, _ = client_of()
    with pytest.raises(OSError, match="max_message"):
        Messages(client, dataclasses.replace(TEXT, max_message=16), "o", typed=False).write(b"x" * 40)
    assert (client.failure, client.code) == ("message_too_big", 1009)


def test_typed_binary_output_is_counted_by_the_window_and_prefixed_by_its_channel() -> None:
    client, stream = client_of()
    binary = dataclasses.replace(TEXT, messages="binary")
    Messages(client, binary, "o", typed=True).write(b"\x00\x01 out")
    Messages(client, binary, "e", typed=True).write(b"err")
    assert sent_frames(stream) == [(Opcode.BINARY, b"o\x00\x01 out"), (Opcode.BINARY, b"eerr")]
    assert client.window.sent == 6  # the output only: stderr is not acknowledged
