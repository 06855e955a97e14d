"""`gsrv send HOST:PORT`: stdin to a service, half-close, the reply to stdout.

A plain blocking client (it is not the server). Exits 0 only after a clean EOF.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

CHUNK = 64 * 1024


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'expected HOST:PORT, like 127.0.0.1:7001 (got "{text}")')
    return host, int(port)


def _pump_stdin(sock: socket.socket, errors: list[str]) -> None:
    try:
        while data := os.read(0, CHUNK):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        errors.append(f"sending failed: {e.strerror or e}")


def send(target: str) -> int:
    """Run the client; returns the exit status."""
    try:
        host, port = parse_target(target)
        sock = socket.create_connection((host, port), timeout=10)
    except ValueError as e:
        print(f"Error: {e}\nFor help, use gsrv -h", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"Error: cannot connect to {target}: {e.strerror or e}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    errors: list[str] = []
    sender = threading.Thread(target=_pump_stdin, args=(sock, errors), daemon=True)
    sender.start()
    received = 0
    out = sys.stdout.buffer
    try:
        while data := sock.recv(CHUNK):
            out.write(data)
            received += len(data)
        out.flush()
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
