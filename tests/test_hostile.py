"""The hostile probe's inputs against a real gsrv: each is answered or refused within its own
connection, and a gsrv whose stderr is a pipe nobody reads keeps serving through all of them
(a traceback written to a full pipe once froze the whole server)."""

from __future__ import annotations

import base64
import os
import socket
import struct
from pathlib import Path

import bcrypt
import pytest
from conftest import exchange, service_toml, service_with

TOKEN = "first-secret-token-0123"


def upgrade(address: tuple[str, int], protocol: str = "", headers: str = "") -> tuple[socket.socket, bytes]:
    """A WebSocket upgrade: the socket and gsrv's answer's head."""
    sock = socket.create_connection(address, timeout=20)
    key = base64.b64encode(os.urandom(16)).decode()
    extra = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                 f"{extra}{headers}\r\n".encode())  # fmt: skip
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return sock, head


def masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack("!H", size)
    return bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_code(sock: socket.socket) -> int | None:
    """The code of gsrv's close frame (skipping what comes before it); None: no close frame."""
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


def http_status(address: tuple[str, int], head: bytes) -> bytes:
    with socket.create_connection(address, timeout=20) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer.split(b"\r\n", 1)[0]


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
