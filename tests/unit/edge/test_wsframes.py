"""gsrv's WebSocket frame layer without a socket: a client's frames made by an independent
library (wsproto, as a client) come out whole and in order however the bytes are split, and
each rule of RFC 6455 a client may break is a ProtocolError with its close code."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol

from gsrv.edge.wsframes import Control, Data, FrameReader, Opcode, ProtocolError, close, frame


def client_frames(*messages: bytes | str) -> bytes:
    proto = FrameProtocol(client=True, extensions=[])
    return b"".join(proto.send_data(m) for m in messages) + proto.ping(b"p") + proto.close(1000, "bye")


def read_all(raw: bytes, cuts: list[int]) -> list[Data | Control]:
    reader, events, at = FrameReader(), [], 0
    for cut in sorted({*cuts, len(raw)}):
        reader.feed(raw[at:cut])
        at = cut
        while (event := reader.next()) is not None:
            events.append(event)
    return events


@settings(max_examples=settings.default.max_examples * 60 // 100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=300_000), max_size=8))
def test_frames_come_out_whole_however_the_bytes_are_split(cuts: list[int]) -> None:
    binary, text = os.urandom(200_000), "héllo wörld " * 30
    events = read_all(client_frames(binary, text, b""), cuts)
    data = [e for e in events if isinstance(e, Data)]
    assert b"".join(e.payload for e in data if not e.text) == binary
    assert b"".join(e.payload for e in data if e.text).decode() == text
    assert [e.last for e in data].count(True) == 3
    assert [(e.opcode, e.payload) for e in events if isinstance(e, Control)] == [
        (Opcode.PING, b"p"), (Opcode.CLOSE, struct.pack("!H", 1000) + b"bye")]  # fmt: skip


def masked(first: int, payload: bytes, mask: bytes = b"\1\2\3\4") -> bytes:
    length = len(payload)
    head = bytes([first, 0x80 | length]) if length < 126 else bytes([first, 0x80 | 126]) + struct.pack("!H", length)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize(("raw", "code"), [
    (bytes([0x82, 0x01]) + b"x", 1002),  # not masked
    (masked(0xC2, b"x"), 1002),  # RSV1 without an extension
    (masked(0x83, b"x"), 1002),  # opcode 3
    (masked(0x09, b"p"), 1002),  # a fragmented ping
    (masked(0x89, b"p" * 126), 1002),  # a ping over 125 bytes
    (masked(0x80, b"x"), 1002),  # a continuation outside a message
    (masked(0x01, b"a") + masked(0x81, b"b"), 1002),  # a new message inside a fragmented one
    (masked(0x81, b"\xff\xfe"), 1007),  # a text message that is not UTF-8
    (masked(0x88, b"\x03"), 1002),  # a one-byte close payload
    (masked(0x88, struct.pack("!H", 1005)), 1002),  # a close code a client may not send
    (masked(0x88, struct.pack("!H", 1000) + b"\xff"), 1007),  # a close reason that is not UTF-8
])  # fmt: skip
def test_each_rule_a_client_breaks_is_its_close_code(raw: bytes, code: int) -> None:
    reader = FrameReader()
    reader.feed(raw)
    with pytest.raises(ProtocolError) as e:
        while reader.next() is not None:
            pass
    assert e.value.code == code


def test_utf8_split_across_frames_is_text_and_server_frames_parse_in_wsproto() -> None:
    snowman = "☃".encode()
    events = read_all(masked(0x01, snowman[:1]) + masked(0x00, snowman[1:2]) + masked(0x80, snowman[2:]), [])
    assert b"".join(e.payload for e in events if isinstance(e, Data)) == snowman
    proto = FrameProtocol(client=True, extensions=[])
    proto.receive_bytes(frame(Opcode.BINARY, b"x" * 70_000) + frame(Opcode.TEXT, b"hi") + close(1011, "exit=3"))
    got = [(f.opcode, f.payload) for f in proto.received_frames()]
    assert [(op.name, len(p) if isinstance(p, bytes) else p) for op, p in got] == [
        ("BINARY", 70_000), ("TEXT", "hi"), ("CLOSE", (1011, "exit=3"))]  # fmt: skip
