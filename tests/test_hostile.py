"""The hostile probe's inputs against a real gsrv: each is answered or refused within its own
connection, and a gsrv whose stderr is a pipe nobody reads keeps serving through all of them
(a traceback written to a full pipe once froze the whole server)."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from pathlib import Path

import bcrypt
import pytest
from conftest import exchange, service_toml, service_with, wait_until

TOKEN = "first-secret-token-0123"


def upgrade(
    address: tuple[str, int], protocol: str = "", path: str = "/", host: str = "", headers: str = ""
) -> tuple[socket.socket, bytes]:
    """A WebSocket upgrade: the socket and gsrv's answer's head."""
    sock = socket.create_connection(address, timeout=20)
    key = base64.b64encode(os.urandom(16)).decode()
    extra = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
    host = host or f"{address[0]}:{address[1]}"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                 f"{extra}{headers}\r\n".encode())  # fmt: skip
    return sock, read_until(sock, b"\r\n\r\n", 1)  # a byte at a time: the frames after it stay unread


def masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack("!H", size)
    return bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_code(sock: socket.socket, data_frames: bool = True) -> int | None:
    """The code of gsrv's close frame (skipping what comes before it, which holds no message
    unless `data_frames`); None: no close frame."""
    data = b""
    while True:
        while len(data) >= 2:
            size, start = data[1] & 0x7F, 2
            if size == 126:
                if len(data) < 4:
                    break
                size, start = struct.unpack("!H", data[2:4])[0], 4
            if len(data) < start + size:
                break
            assert data_frames or data[0] & 0x0F not in (0x0, 0x1, 0x2), data
            if data[0] & 0x0F == 0x8:
                return int(struct.unpack("!H", data[start : start + 2])[0]) if size >= 2 else 1005
            data = data[start + size :]
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk


def read_until(sock: socket.socket, marker: bytes, size: int) -> bytes:
    """What the socket gives, `size` bytes a read, until `marker` came or the connection ended."""
    got = b""
    while marker not in got:
        chunk = sock.recv(size)
        if not chunk:
            break
        got += chunk
    return got


def http_status(address: tuple[str, int], head: bytes) -> bytes:
    with socket.create_connection(address, timeout=20) as sock:
        sock.sendall(head)
        return read_until(sock, b"\r\n", 4096).split(b"\r\n", 1)[0]


OTHER_INPUTS = [
    (b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n", b"HTTP/1.1 505 HTTP Version Not Supported"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"HTTP/1.1 505 HTTP Version Not Supported"),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x07b\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
    (b"GET / HTTP/1.1\r\nHost: evil.example@127.0.0.1\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
    (b"GET /a/../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
]


@pytest.mark.timeout(120)
def test_a_gsrv_nobody_reads_keeps_serving_through_every_hostile_prelude(gsrv, tmp_path: Path) -> None:
    users, tokens = tmp_path / "htpasswd", tmp_path / "tokens"
    users.write_text("alice:" + bcrypt.hashpw(b"alice-secret", bcrypt.gensalt(4)).decode() + "\n")
    tokens.write_text(TOKEN + "\n")
    lenient = {"failures_per_minute": 100_000}
    server = gsrv(
        service_with(
            "term",
            ["cat"],
            "websocket",
            {"reattach": "1m"},
            transport="websocket",
            pty=True,
            auth={"bearer": str(tokens)} | lenient,
        )  # fmt: skip
        + service_toml("basic", ["cat"], transport="http", auth={"basic": str(users)} | lenient)
        + service_toml("bearer", ["cat"], transport="http", auth={"bearer": str(tokens)} | lenient)
        + service_toml("cat", ["cat"])
    )
    term, basic, bearer = (server.address(name) for name in ("term", "basic", "bearer"))
    server.stop_reading()
    deep_hello = masked(0x2, b"h" + b"[" * 3000)
    foreign_bearer = masked(0x2, b'h{"bearer":"\xc3\xa9\xc3\xa9\xc3\xa9"}')
    for _ in range(40):  # each once wrote a ~2.3 kB traceback to fd 2: 40 of each fill a 64 KiB pipe
        sock, head = upgrade(term, "gsrv-term")
        with sock:
            assert head.startswith(b"HTTP/1.1 101 "), head
            sock.sendall(deep_hello)
            assert close_code(sock) == 1008
        sock, head = upgrade(term, "gsrv-term")
        with sock:
            sock.sendall(foreign_bearer)
            assert close_code(sock) == 4401
        answer = http_status(basic, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic \xe9\xe9\r\n\r\n")
        assert answer == b"HTTP/1.1 401 Unauthorized"
        answer = http_status(bearer, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xe9\xe9\xe9\r\n\r\n")
        assert answer == b"HTTP/1.1 401 Unauthorized"
        for raw, status in OTHER_INPUTS:  # the probe's other inputs: each answered, none a traceback
            assert http_status(basic, raw) == status
        with server.connect("cat") as sock:
            assert exchange(sock, b"still here") == b"still here"
    assert server.proc.poll() is None


@pytest.mark.timeout(60)
def test_the_spawner_and_the_guardian_write_their_stderr_to_a_pipe_gsrv_reads(gsrv) -> None:
    server = gsrv(service_toml("cat", ["cat"]))
    own = f"/proc/{server.proc.pid}/fd"
    gsrv_fds = {os.readlink(f"{own}/{fd}") for fd in os.listdir(own)}
    for pid in (server.spawner_pid(), server.guardian_pid()):
        stderr = os.readlink(f"/proc/{pid}/fd/2")
        assert stderr.startswith("pipe:") and stderr in gsrv_fds, (pid, stderr)
        assert stderr != os.readlink(f"{own}/2")  # not gsrv's own stderr: a pipe of its own, into the log


@pytest.mark.timeout(60)
def test_a_websocket_upgrade_refuses_what_the_http_transport_refuses_before_any_101(gsrv) -> None:
    server = gsrv(service_toml("ws", ["cat"], transport="websocket"))
    address = server.address("ws")
    port = address[1]
    for path, host in (("/%00", ""), ("/a/../../etc/passwd", ""), ("/a/%2e%2e/b", ""),
                       ("/", f"evil.example@127.0.0.1:{port}"), ("/", f"127.0.0.1:{port}/evil")):  # fmt: skip
        sock, head = upgrade(address, path=path, host=host)
        sock.close()
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (path, host, head)
    wait_until(lambda: server.count_log(r"event=session_end service=ws .*reason=bad_request") == 5, 10, "five lines")
    assert not any("spawn_failed" in line or "exit=" in line for line in server.lines)


def admin_status(address: tuple[str, int], raw: bytes) -> bytes:
    """The status line of the admin listener's answer to raw bytes."""
    return http_status(address, raw)


@pytest.mark.timeout(90)
def test_the_admin_listener_refuses_bad_input_and_holds_at_most_its_connections(gsrv, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    server = gsrv(f'[admin]\nlisten = "127.0.0.1:0"\nauth = {{ bearer = "{tokens}" }}\n' + service_toml("cat", ["cat"]))
    host, _, port = (
        server.wait_log(r"event=admin_listening address=\S+").split("address=")[1].split()[0].rpartition(":")
    )
    admin = (host, int(port))
    assert admin_status(
        admin, b"GET /sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xe9\xe9\r\n\r\n"
    ) == (b"HTTP/1.1 401 Unauthorized")
    body = b"[" * 4000
    post = (b"POST /services/cat/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    assert admin_status(admin, post) == b"HTTP/1.1 400 Bad Request"
    for bad in (b"evil.example@127.0.0.1", b"127.0.0.1/evil"):
        assert (
            admin_status(admin, b"GET /healthz HTTP/1.1\r\nHost: " + bad + b"\r\n\r\n") == b"HTTP/1.1 400 Bad Request"
        )
    before = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    halves = []
    for _ in range(150):  # each sends half a request and waits
        sock = socket.create_connection(admin, timeout=20)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        halves.append(sock)
    try:
        with server.connect("cat") as sock:  # another service still answers
            assert exchange(sock, b"still here") == b"still here"
        held = len(os.listdir(f"/proc/{server.proc.pid}/fd")) - before
        assert held <= 64 + 5, held  # the rest wait in the backlog, holding none of gsrv's fds
    finally:
        for sock in halves:
            sock.close()
    assert not any("Traceback" in line for line in server.lines)


@pytest.mark.timeout(60)
def test_an_upgrade_whose_header_and_hello_carry_different_tokens_is_refused(gsrv, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\nsecond-secret-token-0123\n")
    server = gsrv(service_with("term", ["cat"], "websocket", {"reattach": "1m"}, transport="websocket", pty=True,
                               auth={"bearer": str(tokens)}))  # fmt: skip
    for hello, code in ((b'h{"bearer":"second-secret-token-0123"}', 4401), (b'h{"bearer":"' + TOKEN.encode() + b'"}',
                                                                            None)):  # fmt: skip
        sock, head = upgrade(server.address("term"), "gsrv-term", headers=f"Authorization: Bearer {TOKEN}\r\n")
        with sock:
            assert head.startswith(b"HTTP/1.1 101 "), head
            sock.sendall(masked(0x2, hello))
            if code is not None:
                assert close_code(sock) == code
            else:  # the same token twice: the session runs (its answer comes first)
                sock.settimeout(10)
                assert sock.recv(2)[0] & 0x0F == 0x2
    assert server.count_log(r"reason=unauthorized") == 1


@pytest.mark.timeout(90)
def test_the_admin_listener_ends_a_head_that_trickles_in_past_its_deadline(gsrv) -> None:
    server = gsrv('[admin]\nlisten = "127.0.0.1:0"\n' + service_toml("cat", ["cat"]))
    host, _, port = (
        server.wait_log(r"event=admin_listening address=\S+").split("address=")[1].split()[0].rpartition(":")
    )
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 60  # a byte each 0.5 s: 50 s
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sent = 0
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.5)
                sock.setblocking(False)
                try:
                    if sock.recv(100) == b"":
                        break  # gsrv closed it
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
        except (ConnectionResetError, BrokenPipeError):
            pass
    assert sent < len(head), "a head trickling in a byte every 0.5 s was never ended"
