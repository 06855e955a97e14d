"""A client that streams flat out through an echo service (`cat`) until it is ended or
`seconds` pass: the busy neighbour in the latency measure. Usage: HOST PORT SECONDS.
Prints one line, "streaming", once the first echoed bytes are back."""

import socket
import sys
import threading
import time

host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sock = socket.create_connection((host, port), timeout=30)
block = bytes(65536)
deadline = time.monotonic() + seconds


def push() -> None:
    try:
        while time.monotonic() < deadline:
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


threading.Thread(target=push, daemon=True).start()
said = False
try:
    while sock.recv(262144):
        if not said:
            print("streaming", flush=True)
            said = True
except OSError:
    pass
