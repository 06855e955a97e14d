"""gsrv's memory per detached terminal session (reattach, the gsrv-term protocol): N pty
sessions over WebSocket whose clients sent the hello and then read nothing, dropped (their
connections closed without a close frame); gsrv keeps each session's output from the last
acknowledged offset, at most reattach_buffer (default 256 KiB), and the child then blocks.
Measured as gsrv's RSS with the N sessions detached minus its RSS before them, over N: with a
child that floods (`yes`: the buffer full) and with one that writes nothing (`sleep`: what a
detached session costs besides its output). Each case in a fresh gsrv (freed memory is not
given back to the system at once, so a second case in the same process would read low).

Usage: python bench/detached.py [--sessions 200] [--out bench/results/detached.md]
Traffic stays on 127.0.0.1; the script ends only the gsrv it started, by PID.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import socket
import statistics
import tempfile
import time

import psutil
from serving import serve

KiB = 1024
CONFIG = """[server]
kill_grace = "1s"
drain_timeout = "1s"
[services.term]
listen = "127.0.0.1:0"
command = {command}
pty = true
max_sessions = 1000
kill_scope = "group"
transport = "websocket"
websocket = {{ reattach = "10m", ping_interval = "0s" }}
"""


def masked(payload: bytes) -> bytes:
    """A client's binary frame (a zero mask: RFC 6455 allows any key)."""
    assert len(payload) < 126
    return bytes([0x82, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def open_session(port: int) -> socket.socket:
    """Upgraded with gsrv-term, the hello sent, gsrv's answer read: the session runs."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: gsrv-term\r\n"
                 "\r\n".encode() + masked(b"h{}") + masked(b"r80x24"))  # fmt: skip
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    answer = sock.recv(2)  # the answer's frame head, then its payload ("h{...}")
    sock.recv(answer[1] & 0x7F)
    return sock


def rss(proc: psutil.Process) -> int:
    return statistics.median(proc.memory_info().rss for _ in range(5) if time.sleep(0.1) is None)


def found(log_path: str, pattern: str) -> list[str]:
    with open(log_path) as f:
        return re.findall(pattern, f.read())


def count(log_path: str, pattern: str) -> int:
    return len(found(log_path, pattern))


def case(command: list[str], sessions: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = CONFIG.format(command="[" + ", ".join(f'"{a}"' for a in command) + "]")
        proc, address, log_path = serve(tmp, config, 1)
        port = address["term"][1]
        gsrv = psutil.Process(proc.pid)
        try:
            for sock in [open_session(port) for _ in range(5)]:  # warm up: the spawner, pools, code paths
                sock.close()
            deadline = time.monotonic() + 60
            while count(log_path, "event=session_detached") < 5 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1)
            before = rss(gsrv)
            socks = [open_session(port) for _ in range(sessions)]
            time.sleep(3)  # the output fills each window (yes), or nothing comes (sleep)
            attached = rss(gsrv)
            for sock in socks:
                sock.close()
            deadline = time.monotonic() + 60
            while count(log_path, "event=session_detached") < 5 + sessions and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(3)
            detached = rss(gsrv)
            kept = [int(k) for k in found(log_path, r"event=session_detached .*kept=(\d+)")]
            return {"before": before, "attached": attached, "detached": detached,
                    "per_session": (detached - before) / sessions, "kept_most": max(kept[5:], default=0)}  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    for name, command in (("yes (output pending)", ["yes"]), ("sleep (no output)", ["sleep", "3600"])):
        figures = case(command, args.sessions)
        rows.append((name, figures))
        print(name, {k: round(v) for k, v in figures.items()}, flush=True)
    lines = [
        f"# Memory per detached terminal session ({args.sessions} sessions, reattach_buffer 256 KiB)",
        "",
        "`python bench/detached.py` (" + time.strftime("%Y-%m-%d") + "): gsrv's RSS with the sessions detached, "
        "minus before them, over their count; target <= reattach_buffer + 64 KiB = 320 KiB.",
        "",
        "| child | RSS before | attached (client not reading) | detached | per detached session | most kept |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, f in rows:
        lines.append(f"| {name} | {f['before'] / KiB / KiB:.1f} MiB | {f['attached'] / KiB / KiB:.1f} MiB | "
                     f"{f['detached'] / KiB / KiB:.1f} MiB | {f['per_session'] / KiB:.0f} KiB | "
                     f"{f['kept_most'] / KiB:.0f} KiB |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
