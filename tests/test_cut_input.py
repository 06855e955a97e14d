"""A cut input never reaches the child as a clean EOF, on every transport: a reset, a TLS close
without close_notify, a WebSocket message left open by a close frame. The child is signalled
before its stdin closes, every time (the probe's child wrote its marker in 2-4 runs of 10)."""

from __future__ import annotations

import socket
import ssl
import struct
from pathlib import Path

import pytest
from conftest import service_toml, tls_files, wait_until
from test_hostile import close_code, masked, upgrade

RUNS = 10


def marker_child(marker: Path) -> list[str]:
    """Reads its input to its end, then leaves its marker: only a whole input writes it."""
    return ["sh", "-c", f'cat >/dev/null; : > "{marker}"']


def reset_after(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.timeout(120)
def test_a_reset_or_a_tls_close_without_close_notify_is_never_the_inputs_end(gsrv, tmp_path: Path) -> None:
    ca, tls = tls_files(tmp_path)
    plain, secure = tmp_path / "plain-done", tmp_path / "tls-done"
    server = gsrv(service_toml("plain", marker_child(plain)) + service_toml("tls", marker_child(secure), tls=tls))
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    for run in range(RUNS):
        with server.connect("plain") as sock:
            reset_after(sock, b"x" * 1400)
        tls_sock = context.wrap_socket(server.connect("tls"), server_hostname="127.0.0.1")
        tls_sock.sendall(b"y" * 1400)
        if run % 2:
            tls_sock.shutdown(socket.SHUT_WR)  # a FIN, no close_notify (SSLSocket.shutdown sends none)
            tls_sock.close()
        else:
            reset_after(tls_sock, b"")
    for name in ("plain", "tls"):
        wait_until(
            lambda name=name: server.count_log(rf"event=session_end service={name} ") == RUNS, 30, f"{name}'s ends"
        )
    assert not plain.exists() and not secure.exists()


@pytest.mark.timeout(120)
def test_a_websocket_message_left_open_by_a_close_frame_is_a_cut_input(gsrv, tmp_path: Path) -> None:
    marker = tmp_path / "done"
    server = gsrv(service_toml("ws", marker_child(marker), transport="websocket"))
    for _ in range(RUNS):
        sock, head = upgrade(server.address("ws"))
        with sock:
            assert head.startswith(b"HTTP/1.1 101 "), head
            first = bytearray(masked(0x1, b"fragment1"))
            first[0] &= 0x7F  # not the message's last frame
            sock.sendall(bytes(first) + masked(0x8, struct.pack("!H", 1000)))
            assert close_code(sock, data_frames=False) == 1000  # and no message echoed before it
    server.wait_log(r"reason=message_cut")
    assert not marker.exists()
