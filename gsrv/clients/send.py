"""`gsrv send HOST:PORT`: stdin to a service, half-close, the reply to stdout.

A plain blocking client (it is not the server). Exits 0 only after a clean EOF. With --raw
(a pty service, from a terminal) the local terminal is put in raw mode while connected, so
keys, ^C and ^D reach the remote terminal as typed, as under ssh.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import termios
import threading
import tty
from collections.abc import Iterator

CHUNK = 64 * 1024


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'expected HOST:PORT or unix:/path, like 127.0.0.1:7001 (got "{text}")')
    return host, int(port)


def connect(target: str) -> socket.socket:
    """HOST:PORT or unix:/path. Raises ValueError (a bad target) or OSError."""
    if target.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(target.removeprefix("unix:"))
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection(parse_target(target), timeout=10)


@contextlib.contextmanager
def raw_terminal(raw: bool) -> Iterator[None]:
    """The local terminal in raw mode (if asked and stdin is one), restored however we leave."""
    if not (raw and os.isatty(0)):
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSAFLUSH, saved)


def _write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def _pump_stdin(sock: socket.socket, errors: list[str]) -> None:
    try:
        while data := os.read(0, CHUNK):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        errors.append(f"sending failed: {e.strerror or e}")


def send(target: str, raw: bool = False) -> int:
    """Run the client; returns the exit status."""
    try:
        sock = connect(target)
    except ValueError as e:
        print(f"Error: {e}\nFor help, use gsrv -h", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"Error: cannot connect to {target}: {e.strerror or e}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    with raw_terminal(raw):
        return _relay(sock, target)


def _relay(sock: socket.socket, target: str) -> int:
    errors: list[str] = []
    sender = threading.Thread(target=_pump_stdin, args=(sock, errors), daemon=True)
    sender.start()
    received = 0
    try:
        while data := sock.recv(CHUNK):
            _write_all(data)  # at once: an interactive reply must not wait in a buffer
            received += len(data)
    except OSError as e:
        print(
            f"Error: {target} reset the connection after {received} bytes of reply "
            f"({e.strerror or e}); the reply is incomplete",
            file=sys.stderr,
        )
        return 1
    finally:
        sock.close()
    sender.join(timeout=0.5)
    if errors and not sender.is_alive():
        # The reply ended cleanly, yet not all input was sent: the service stopped reading.
        print(f"gsrv send: {errors[0]}; the reply ended cleanly", file=sys.stderr)
    return 0
