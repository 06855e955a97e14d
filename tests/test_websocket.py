"""transport = "websocket" with real gsrv and an independent client library (websockets, from
PyPI): round trips, bounds, the child's end as the close code, the origin check, pings, wss://."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, py_child, service_with, tls_files, wait_until
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from wsproto.frame_protocol import Frame, FrameProtocol, Opcode

from gsrv.config.web import WebSocketConfig
from gsrv.edge.httphead import Request
from gsrv.edge.upgrade import judge, origin_allowed

MiB = 1024 * 1024
WS = {"transport": "websocket"}


def ws_service(name: str, command: list[str], websocket: dict[str, object] | None = None, **keys: object) -> str:
    return service_with(name, command, "websocket", websocket, **WS, **keys)


def url(server, name: str, path: str = "/", scheme: str = "ws") -> str:
    host, port = server.address(name)
    return f"{scheme}://{host}:{port}{path}"


def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Receive until the close frame; its code and reason."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=20)
    rcvd = closed.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, None)


def stream_through(uri: str, messages: list[bytes] | list[str]) -> tuple[str, int | None]:
    """Send every message while receiving (asyncio: the sync client cannot read while a send
    blocks, and gsrv, bounded, stops reading while its reply is not read); the digest of what
    came back (a newline after each text message), and the close code after our close."""

    async def run() -> tuple[str, int | None]:
        got = hashlib.sha256()
        async with aconnect(uri, max_size=None) as ws:

            async def send() -> None:
                for message in messages:
                    await ws.send(message)

            sender = asyncio.create_task(send())
            expected, received = sum(len(m) for m in messages), 0
            while received < expected:
                message = await asyncio.wait_for(ws.recv(), 30)
                data = message.encode() + b"\n" if isinstance(message, str) else message
                got.update(data)
                received += len(message)
            await sender
            await ws.close()
            return got.hexdigest(), ws.close_code

    return asyncio.run(run())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_text_messages_round_trip_64_mib_exact(gsrv) -> None:
    server = gsrv(ws_service("cat", ["cat"]))
    line = base64.b64encode(os.urandom(6 * 1024)).decode()  # 8 KiB a line, well under max_message
    lines = [f"{n:08d}{line}" for n in range(64 * MiB // len(line))]
    sent = hashlib.sha256("".join(f"{message}\n" for message in lines).encode())
    got, code = stream_through(url(server, "cat"), lines)
    assert got == sent.hexdigest() and code == 1000
    line_end = server.wait_log(r"event=session_end service=cat ")
    assert "relay=websocket" in line_end and "reason=eof" in line_end, line_end


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_binary_messages_round_trip_64_mib_exact(gsrv) -> None:
    server = gsrv(ws_service("cat", ["cat"], {"messages": "binary"}))
    block = os.urandom(MiB)
    chunks = [bytes([n % 256]) + block[: 65536 - 1] for n in range(1024)]  # 64 MiB in 64 KiB messages
    sent = hashlib.sha256(b"".join(chunks))
    got, code = stream_through(url(server, "cat"), chunks)
    assert got == sent.hexdigest() and code == 1000
    assert f"bytes_in={64 * MiB} bytes_out={64 * MiB} " in server.wait_log(r"event=session_end service=cat ")


@pytest.mark.timeout(60)
def test_a_line_over_max_message_closes_with_1009(gsrv) -> None:
    server = gsrv(ws_service("long", py_child("print('x' * 5000)"), {"max_message": "1KiB"}))
    with connect(url(server, "long")) as ws:
        assert closed_with(ws) == (1009, "message_too_big")
    assert "reason=message_too_big" in server.wait_log(r"event=session_end service=long ")


@pytest.mark.timeout(60)
def test_exit_3_closes_with_1011_and_its_status(gsrv) -> None:
    server = gsrv(ws_service("three", ["sh", "-c", "echo bye; exit 3"]))
    with connect(url(server, "three")) as ws:
        assert ws.recv(timeout=20) == "bye"
        assert closed_with(ws) == (1011, "exit=3")
    line = server.wait_log(r"event=session_end service=three ")
    assert "exit=3" in line and "reason=child_exit" in line, line


@pytest.mark.timeout(60)
def test_a_killed_child_closes_with_1011_and_its_signal(gsrv) -> None:
    server = gsrv(ws_service("killed", ["sh", "-c", "kill -KILL $$"]))
    with connect(url(server, "killed")) as ws:
        assert closed_with(ws) == (1011, "signal=KILL")
    assert "signal=KILL" in server.wait_log(r"event=session_end service=killed ")


@pytest.mark.timeout(60)
def test_exit_0_closes_with_1000(gsrv) -> None:
    server = gsrv(ws_service("ok", ["echo", "hi"]))
    with connect(url(server, "ok")) as ws:
        assert ws.recv(timeout=20) == "hi"
        assert closed_with(ws) == (1000, "exit=0")


@pytest.mark.timeout(60)
def test_a_wrong_origin_gets_403_and_no_child(gsrv, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    server = gsrv(ws_service("guarded", ["touch", str(marker)]))
    with pytest.raises(InvalidStatus) as refused:
        connect(url(server, "guarded"), origin="http://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    line = server.wait_log(r"event=session_end service=guarded ")
    assert "reason=origin_denied" in line and "bytes_in=0" in line, line
    host, port = server.address("guarded")
    with connect(url(server, "guarded"), origin=f"http://{host}:{port}") as ws:  # type: ignore[arg-type]
        assert closed_with(ws) == (1000, "exit=0")  # the page's own origin: allowed
    assert marker.exists()
    assert server.count_log(r"reason=origin_denied") == 1


@pytest.mark.timeout(60)
def test_a_silent_client_ends_at_its_ping_timeout(gsrv) -> None:
    server = gsrv(ws_service("quiet", ["sleep", "30"], {"ping_interval": "200ms", "ping_timeout": "300ms"}))
    host, port = server.address("quiet")
    with socket.create_connection((host, port), timeout=20) as sock:  # a client that upgrades, then goes mute
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())  # fmt: skip
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
        line = server.wait_log(r"event=session_end service=quiet ", timeout=30)
    assert "reason=client_reset" in line and "ping_timeout=1" in line, line


@pytest.mark.timeout(60)
def test_a_client_that_answers_pings_stays(gsrv) -> None:
    server = gsrv(ws_service("chat", ["cat"], {"ping_interval": "100ms", "ping_timeout": "200ms"}))
    with connect(url(server, "chat")) as ws:  # websockets answers pings by itself
        time.sleep(1.5)
        ws.send("still here")
        assert ws.recv(timeout=10) == "still here"


@pytest.mark.timeout(60)
def test_wss_with_a_trustme_ca(gsrv, tmp_path: Path) -> None:
    ca, tls = tls_files(tmp_path)
    server = gsrv(ws_service("secure", ["cat"], tls=tls))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with connect(url(server, "secure", scheme="wss"), ssl=context) as ws:
        ws.send("over TLS")
        assert ws.recv(timeout=20) == "over TLS"
        ws.close()
    line = server.wait_log(r"event=session_end service=secure ")
    assert "tls=TLSv1.3" in line and "reason=eof" in line, line


@pytest.mark.timeout(60)
def test_the_child_gets_the_request_as_cgi_variables(gsrv) -> None:
    code = (
        "import os; print(*(os.environ.get(k, '-') for k in ('REQUEST_METHOD', 'REQUEST_URI', 'PATH_INFO', "
        "'QUERY_STRING', 'REMOTE_ADDR', 'HTTP_USER_AGENT', 'HTTP_PROXY', 'TCPREMOTEIP')))"
    )
    server = gsrv(ws_service("env", py_child(code), {"path": "/app", "headers": ["User-Agent"]}))
    with connect(url(server, "env", "/app/sub?x=1"), user_agent_header="probe/1",
                 additional_headers={"Proxy": "http://evil.example"}) as ws:  # fmt: skip
        assert ws.recv(timeout=20) == "GET /app/sub?x=1 /sub x=1 127.0.0.1 probe/1 - 127.0.0.1"


@pytest.mark.timeout(60)
def test_plain_http_gets_400_or_the_console_page(gsrv) -> None:
    server = gsrv(ws_service("plain", ["cat"]) + ws_service("page", ["cat"], {"console": True, "path": "/try"}))
    for name, path, status, reason in (("plain", "/", 400, "bad_request"), ("page", "/try", 200, "console"),
                                       ("page", "/other", 404, "bad_request")):  # fmt: skip
        host, port = server.address(name)
        with socket.create_connection((host, port), timeout=20) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
        assert f"reason={reason}" in server.wait_log(rf"event=session_end service={name} .*reason={reason}")
        if status == 200:
            assert b"new WebSocket(" in reply and b'MESSAGES = "text"' in reply


@pytest.mark.timeout(60)
def test_stderr_and_resizes_share_the_channel_with_typed_framing(gsrv) -> None:
    code = "import os, sys; sys.stdin.readline(); print(os.get_terminal_size(0)); print('oops', file=sys.stderr)"
    server = gsrv(ws_service("term", py_child(code), pty=True, stderr="websocket"))
    with connect(url(server, "term")) as ws:
        ws.send("r120x40")
        ws.send("igo\r")  # Enter: the terminal makes CR a newline
        got: dict[int, bytes] = {ord("o"): b"", ord("e"): b""}
        with pytest.raises(ConnectionClosed):
            while True:
                message = ws.recv(timeout=20)
                assert isinstance(message, bytes)  # with a pty, messages are binary: a terminal is a stream
                got[message[0]] += message[1:]
    assert b"os.terminal_size(columns=120, lines=40)\r\n" in got[ord("o")], got
    assert got[ord("e")] == b"oops\n", got


@pytest.mark.timeout(60)
def test_typed_framing_takes_the_type_from_the_first_byte_whatever_the_fragments(gsrv) -> None:
    server = gsrv(ws_service("typed", ["cat"], stderr="websocket"))
    with raw_client(server, "typed") as (sock, proto):
        sock.sendall(proto.send_data("") + proto.send_data("", fin=False) + proto.send_data("ihi", fin=True))
        sock.sendall(proto.send_data("i", fin=False) + proto.send_data("there", fin=True) + proto.close(1000))
        frames = read_frames(sock, proto)
    assert frames == [(Opcode.TEXT, "ohi"), (Opcode.TEXT, "othere"), (Opcode.CLOSE, (1000, "exit=0"))], frames


@pytest.mark.timeout(60)
def test_pings_wait_while_the_child_does_not_read_and_stop_after_the_clients_close(gsrv) -> None:
    pings = {"ping_interval": "300ms", "ping_timeout": "300ms", "messages": "binary"}
    late = ["sh", "-c", "cat; sleep 2; echo done"]
    server = gsrv(ws_service("deaf", ["sleep", "3"], pings) + ws_service("late", late, pings | {"messages": "text"}))
    with connect(url(server, "deaf"), max_size=None) as ws:  # answers pings, but gsrv cannot read them
        ws.send(b"x" * 2 * MiB)  # more than the pipe and the socket buffers hold
        assert closed_with(ws) == (1000, "exit=0")
    with raw_client(server, "late") as (sock, proto):  # its close frame, then nothing: no pong can come
        sock.sendall(proto.send_data("x") + proto.close(1000))
        assert read_frames(sock, proto) == [(Opcode.TEXT, "x"), (Opcode.TEXT, "done"), (Opcode.CLOSE, (1000, "exit=0"))]
    assert server.count_log(r"ping_timeout=1") == 0


@pytest.mark.timeout(60)
def test_a_frame_cut_short_by_a_timeout_ends_in_a_reset_not_a_torn_close(gsrv) -> None:
    server = gsrv(ws_service("flood", ["cat", "/dev/zero"], {"messages": "binary", "ping_interval": "0s"},
                             session_timeout="1s"))  # fmt: skip
    with raw_client(server, "flood", rcvbuf=4096) as (sock, proto):  # it never reads: gsrv's send blocks
        server.wait_log(r"event=session_end service=flood .*reason=session_timeout")
        frames, reset_seen = whole_frames_then_end(sock, proto)
    assert reset_seen or frames[-1].opcode is Opcode.CLOSE, frames[-1:]


@pytest.mark.timeout(60)
def test_a_child_that_closes_stdout_and_runs_on_is_not_reported_as_finished(gsrv) -> None:
    server = gsrv('[server]\neof_grace = "500ms"\nkill_grace = "1s"\n'
                  + ws_service("runs_on", ["sh", "-c", "echo partial; exec >&-; sleep 30"]))  # fmt: skip
    with connect(url(server, "runs_on")) as ws:
        assert ws.recv(timeout=20) == "partial"
        assert closed_with(ws) == (1011, "child_exit")


@pytest.mark.timeout(60)
def test_a_stderr_line_over_max_message_ends_the_session(gsrv) -> None:
    code = "import sys, time; print('x' * 3000, file=sys.stderr, flush=True); time.sleep(30)"
    server = gsrv(ws_service("loud", py_child(code), {"max_message": "1KiB"}, stderr="websocket"))
    with connect(url(server, "loud")) as ws:
        assert closed_with(ws) == (1009, "message_too_big")
    assert "reason=message_too_big" in server.wait_log(r"event=session_end service=loud ")


@pytest.mark.timeout(60)
def test_a_page_on_another_name_for_loopback_gets_403(gsrv) -> None:
    """DNS rebinding: a page at http://attacker.example:PORT whose name now resolves to 127.0.0.1
    sends its own name as Host, and its Origin matches it; a loopback service answers only
    loopback names (and `hosts`)."""
    server = gsrv(ws_service("local", ["cat"]) + ws_service("named", ["cat"], {"hosts": ["app.example"]}))
    for name, host, status in (("local", "attacker.example", 403), ("local", "localhost", 101),
                               ("named", "app.example", 101), ("named", "attacker.example", 403)):  # fmt: skip
        _, port = server.address(name)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nOrigin: http://{host}:{port}\r\n"
                         f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n".encode())  # fmt: skip
            assert sock.recv(4096).startswith(f"HTTP/1.1 {status} ".encode()), (name, host)
    wait_until(lambda: server.count_log(r"reason=host_denied") == 2, 10, "two host_denied lines")


@pytest.mark.timeout(60)
def test_a_last_line_the_client_is_too_slow_for_ends_in_a_reset_not_a_torn_close(gsrv) -> None:
    code = "import sys; sys.stdout.write(('a' * 1000 + '\\n') * 2500 + 'b' * 900000); sys.stdout.flush()"
    server = gsrv(ws_service("tail", py_child(code), {"max_message": "1MiB", "ping_interval": "0s"}))
    with raw_client(server, "tail", rcvbuf=4096) as (sock, proto):
        server.wait_log(r"event=session_end service=tail ", timeout=20)  # it waited LINGER_S, then gave up
        frames, reset_seen = whole_frames_then_end(sock, proto)
    assert reset_seen or frames[-1].opcode is Opcode.CLOSE, frames[-1:]


@pytest.mark.timeout(60)
def test_the_stderr_channel_is_output_the_session_waits_for(gsrv) -> None:
    code = "import sys; print('done', flush=True); sys.stderr.write(''.join(f'{n}\\n' for n in range(30500)))"
    server = gsrv(ws_service("noisy", py_child(code), {"ping_interval": "0s"}, stderr="websocket"))
    with raw_client(server, "noisy", rcvbuf=4096) as (sock, proto):
        time.sleep(3)  # the child is long done; its stderr waits in the pipe and the socket
        frames = read_frames(sock, proto)
    lines = [payload for opcode, payload in frames if opcode is Opcode.TEXT]
    assert lines[:1] == ["odone"] and sorted(lines[1:]) == sorted(f"e{n}" for n in range(30500)), len(lines)
    assert frames[-1] == (Opcode.CLOSE, (1000, "exit=0"))
    assert "bytes_err=" in server.wait_log(r"event=session_end service=noisy .*reason=child_exit")


@pytest.mark.timeout(60)
def test_a_slow_reader_that_answers_pings_is_not_taken_for_dead(gsrv) -> None:
    code = "import sys; sys.stdout.buffer.write(b'z' * 6_000_000)"
    server = gsrv(
        ws_service("big", py_child(code), {"messages": "binary", "ping_interval": "1s", "ping_timeout": "2s"})
    )
    with raw_client(server, "big", rcvbuf=16384) as (sock, proto):
        received, closed = 0, None
        deadline = time.monotonic() + 40
        while closed is None and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            assert chunk, "EOF before the close frame"
            proto.receive_bytes(chunk)
            for frame in proto.received_frames():
                if frame.opcode is Opcode.PING:
                    sock.sendall(proto.pong(frame.payload))
                elif frame.opcode is Opcode.CLOSE:
                    closed = frame.payload
                else:
                    received += len(frame.payload)
            time.sleep(0.05)  # about 1 MB/s
    assert received == 6_000_000 and closed == (1000, "exit=0"), (received, closed)
    assert server.count_log(r"ping_timeout=1") == 0


@contextlib.contextmanager
def raw_client(server, name: str, rcvbuf: int = 0) -> Iterator[tuple[socket.socket, FrameProtocol]]:
    """An upgraded connection and a client-side frame layer (wsproto's), for frames the
    websockets library would not send."""
    host, port = server.address(name)
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(20)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())  # fmt: skip
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: nothing of the frames after the head is taken
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    with sock:
        yield sock, FrameProtocol(client=True, extensions=[])


def whole_frames_then_end(sock: socket.socket, proto: FrameProtocol) -> tuple[list[Frame], bool]:
    """Everything the client can still read, parsed (a torn frame followed by anything makes
    wsproto raise), and whether it ended with a reset."""
    raw, reset_seen = b"", False
    try:
        while chunk := sock.recv(1 << 20):
            raw += chunk
    except ConnectionResetError:
        reset_seen = True
    proto.receive_bytes(raw)
    return list(proto.received_frames()), reset_seen


def read_frames(sock: socket.socket, proto: FrameProtocol) -> list[tuple[Opcode, object]]:
    """(opcode, payload) of each message until the close frame (wsproto hands a frame's payload
    on in parts as it arrives: joined here)."""
    frames: list[tuple[Opcode, object]] = []
    parts: list[object] = []
    while True:
        for frame in proto.received_frames():
            payload = frame.payload
            if frame.opcode is Opcode.CLOSE:
                frames.append((frame.opcode, (int(payload[0]), payload[1])))
                return frames
            parts.append(payload)
            if frame.message_finished:
                joined = "".join(parts) if isinstance(payload, str) else b"".join(parts)  # type: ignore[arg-type]
                frames.append((frame.opcode, joined))
                parts = []
        chunk = sock.recv(65536)
        assert chunk, frames
        proto.receive_bytes(chunk)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_1_gib_single_frame_message_streams_through_in_bounded_memory(gsrv) -> None:
    server = gsrv(ws_service("count", ["wc", "-c"], {"messages": "binary"}))
    before = server.rss()
    block = os.urandom(MiB)  # a zero masking key: the payload goes out as it is (RFC 6455 allows any key)
    with raw_client(server, "count") as (sock, proto):
        sock.sendall(bytes([0x82, 0x80 | 127]) + (1024 * MiB).to_bytes(8, "big") + b"\0\0\0\0")
        most = before
        for n in range(1024):
            sock.sendall(block)
            if n % 64 == 0:
                most = max(most, server.rss())
        sock.sendall(proto.close(1000, "done"))
        frames = read_frames(sock, proto)
    assert frames == [(Opcode.BINARY, f"{1024 * MiB}\n".encode()), (Opcode.CLOSE, (1000, "exit=0"))], frames
    assert most - before < 16 * MiB


@pytest.mark.timeout(60)
def test_a_client_that_acknowledges_gets_at_most_the_window_and_the_child_waits(gsrv) -> None:
    server = gsrv(ws_service("flood", ["yes"], {"reattach_buffer": "64KiB"}, pty=True))
    with raw_client(server, "flood") as (sock, proto):
        sock.sendall(proto.send_data(b"r80x24") + proto.send_data(b"a0"))

        def received_until_quiet(at_least: int) -> int:
            """What came until 2 s of silence once `at_least` came (a pause of the machine
            before then cannot end it early)."""
            got = 0
            sock.settimeout(2.0)
            while True:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    if got >= at_least:
                        return got
                    continue
                if not chunk:
                    raise AssertionError("the connection ended")
                proto.receive_bytes(chunk)
                got += sum(len(f.payload) - 1 for f in proto.received_frames() if f.opcode is Opcode.BINARY)

        first = received_until_quiet(64 * 1024)  # what was sent before the "a0" arrived, then the window
        assert 64 * 1024 <= first <= 64 * 1024 + 2 * 65536, first
        child = next(p for p in server.children() if p.name() == "yes")
        cpu = sum(child.cpu_times()[:2])
        time.sleep(0.5)
        assert sum(child.cpu_times()[:2]) - cpu < 0.1  # blocked on its write, not spinning
        sock.sendall(proto.send_data(f"a{first}".encode()))
        more = received_until_quiet(1)
        assert 0 < more <= 64 * 1024 + 65536, more


@pytest.mark.timeout(60)
def test_the_shipped_upper_ws_demo_answers_as_the_readme_says(gsrv, tmp_path: Path) -> None:
    text = (ROOT / "conf" / "gsrv.toml").read_text()
    text = re.sub(r'listen = "127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:0"', text)
    server = gsrv(text.replace("unix:/tmp/gsrv-python.sock", f"unix:{tmp_path / 'python.sock'}"))
    host, port = server.address("upper-ws")
    with connect(url(server, "upper-ws"), origin=f"http://{host}:{port}") as ws:  # type: ignore[arg-type]
        ws.send("hello, browser")
        assert ws.recv(timeout=20) == "HELLO, BROWSER"
    with socket.create_connection((host, port), timeout=20) as sock:  # what a browser's plain GET gets
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        page = b""
        while chunk := sock.recv(65536):
            page += chunk
    assert page.startswith(b"HTTP/1.1 200 ") and b"<title>gsrv console</title>" in page


def upgrade_request(method: str, target: str, headers: dict[str, str]) -> Request:
    """An upgrade's head as edge/httphead.py's parse gives it (one request type for both transports)."""
    path, _, query = target.partition("?")
    return Request(method, target, "1.1", tuple(headers.items()), path, query)


def test_judge_and_origins_without_a_socket() -> None:
    ws = WebSocketConfig(path="/ws")
    upgrade = {"upgrade": "websocket", "connection": "keep-alive, Upgrade", "sec-websocket-version": "13",
               "sec-websocket-key": base64.b64encode(b"k" * 16).decode(), "host": "a.example:8080"}  # fmt: skip
    assert judge(upgrade_request("GET", "/ws?x", upgrade), ws, False).status == 101
    assert judge(upgrade_request("GET", "/nope", upgrade), ws, False).status == 404
    assert judge(upgrade_request("POST", "/ws", upgrade), ws, False).status == 405
    assert judge(upgrade_request("GET", "/ws", {**upgrade, "sec-websocket-version": "8"}), ws, False).status == 400
    assert judge(upgrade_request("GET", "/ws", {"host": "a"}), ws, False).status == 400
    denied = judge(upgrade_request("GET", "/ws", {**upgrade, "origin": "http://b.example:8080"}), ws, False)
    assert (denied.status, denied.reason) == (403, "origin_denied")
    local = WebSocketConfig(path="/ws", local_only=True)
    assert judge(upgrade_request("GET", "/ws", upgrade), local, False).reason == "host_denied"
    assert judge(upgrade_request("GET", "/ws", {**upgrade, "host": "127.0.0.1:8080"}), local, False).status == 101
    assert judge(upgrade_request("GET", "/ws", {**upgrade, "host": "[::1]:8080"}), local, False).status == 101
    assert origin_allowed("http://a.example:8080", "a.example:8080", False, ())
    assert origin_allowed("https://a.example", "a.example", True, ())
    assert not origin_allowed("http://a.example", "a.example", True, ())  # the scheme is part of the origin
    assert not origin_allowed("null", "a.example", False, ())
    assert origin_allowed("https://app.example", "a.example", False, ("https://app.example:443",))
    assert origin_allowed("http://anything", "a.example", False, ("*",))
    assert not origin_allowed("http://[::1", "a.example", False, ())  # not a URL: no error, a refusal
    assert (
        judge(upgrade_request("GET", "/ws", {**upgrade, "host": "[::1"}), local, False).reason == "bad_request"
    )  # not a host at all
