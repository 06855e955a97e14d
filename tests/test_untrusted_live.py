"""Arbitrary bytes (hypothesis) at a real gsrv's doors: its HTTP front, its WebSocket upgrade and
its admin listener each answer, refuse or end the connection, and nothing raises past its own
session's code: no `event=stderr` (gevent's report of a greenlet that raised), no
`internal_error`, and the server keeps serving."""

from __future__ import annotations

import socket

import pytest
from conftest import exchange, service_toml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REQUEST_LINE = st.sampled_from([b"GET / HTTP/1.1", b"POST /sessions HTTP/1.1", b"GET /metrics HTTP/1.0",
                                b"PRI * HTTP/2.0", b"GET /status.json HTTP/1.1", b"",
                                b"POST /services/cat/pause HTTP/1.1"])  # fmt: skip
NAMES = [
    b"Host",
    b"Authorization",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Upgrade",
    b"Connection",
    b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Version",
    b"Content-Type",
    b"Origin",
    b"X",
]
VALUES = [b"websocket", b"Upgrade", b"13", b"chunked", b"application/json", b"Bearer \xe9", b"127.0.0.1"]
FIELD = st.tuples(st.sampled_from(NAMES) | st.binary(max_size=10), st.binary(max_size=40) | st.sampled_from(VALUES))
RAW = st.builds(lambda line, fields, body: line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields)
                + b"\r\n" + body, REQUEST_LINE, st.lists(FIELD, max_size=6), st.binary(max_size=80)) | st.binary(
    max_size=200)  # fmt: skip


def send(address: tuple[str, int], raw: bytes) -> None:
    with socket.create_connection(address, timeout=10) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass


@pytest.mark.timeout(300)
def test_arbitrary_bytes_at_every_door_never_raise_past_their_session(gsrv, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("first-secret-token-0123\n")
    auth = {"bearer": str(tokens), "failures_per_minute": 1_000_000}
    server = gsrv(f'[admin]\nlisten = "127.0.0.1:0"\nauth = {{ bearer = "{tokens}" }}\n'
                  + service_toml("web", ["cat"], transport="http", auth=auth, http={"handshake_timeout": "2s"})
                  + service_toml("ws", ["cat"], transport="websocket", websocket={"handshake_timeout": "2s"})
                  + service_toml("cat", ["cat"]))  # fmt: skip
    host, _, port = (
        server.wait_log(r"event=admin_listening address=\S+").split("address=")[1].split()[0].rpartition(":")
    )
    doors = [server.address("web"), server.address("ws"), (host, int(port))]

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(RAW, st.sampled_from(doors))
    def one(raw: bytes, address: tuple[str, int]) -> None:
        send(address, raw)

    one()
    with server.connect("cat") as sock:
        assert exchange(sock, b"still here") == b"still here"
    bad = [line for line in server.lines if "event=stderr" in line or "internal_error" in line or "Traceback" in line]
    assert not bad, bad[:3]
