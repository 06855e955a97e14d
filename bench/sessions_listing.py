"""The operator's /sessions with many sessions (issue 28): N stalled sessions (`sleep` with
relay = "socket", as the issue says), listed three times through the admin listener while a
stream goes through another session of the same gsrv (sha256sum, the splice path); the listing's
time (and gsrv's CPU for it, with no stream) and the stream's rate during the listings against
its rate just before. The stream goes at full speed (sharing the machine's cores with the
listing), or paced with --pace (what tests/test_listing_many.py asserts).

Usage: python bench/sessions_listing.py [--sessions 10000] [--pace MIB_PER_S]
Traffic stays on 127.0.0.1; the script ends only the gsrv it started, by PID.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import tempfile
import threading
import time
import urllib.request

import psutil
from serving import serve

CONFIG = """[admin]
listen = "127.0.0.1:0"
[services.stall]
listen = "127.0.0.1:0"
command = ["sleep", "600"]
relay = "socket"
stderr = "discard"
kill_scope = "group"
max_sessions = {max_sessions}
backlog = 4096
[services.sink]
listen = "127.0.0.1:0"
command = ["sha256sum"]
kill_scope = "group"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--pace", type=float, default=0, help="the stream's MiB/s (0: as fast as it goes)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds a socket per session
    with tempfile.TemporaryDirectory() as tmp:
        proc, address, _ = serve(tmp, CONFIG.format(max_sessions=args.sessions + 10), 3)
        base = "http://{}:{}".format(*address["admin"])
        socks: list[socket.socket] = []
        try:
            started = time.monotonic()
            socks = [socket.create_connection(address["stall"]) for _ in range(args.sessions)]
            while True:
                services = json.load(urllib.request.urlopen(base + "/services", timeout=30))["services"]
                if next(s for s in services if s["name"] == "stall")["sessions"] >= args.sessions:
                    break
                time.sleep(0.5)
            print(f"{args.sessions} sessions running after {time.monotonic() - started:.1f} s", flush=True)
            gsrv = psutil.Process(proc.pid)
            for _ in range(3):
                cpu, t = sum(gsrv.cpu_times()[:2]), time.monotonic()
                urllib.request.urlopen(base + "/sessions", timeout=60).read()
                print(f"alone: listed in {time.monotonic() - t:.3f} s, gsrv's CPU "
                      f"{sum(gsrv.cpu_times()[:2]) - cpu:.3f} s", flush=True)  # fmt: skip
            sent, stop = [0], threading.Event()

            def stream() -> None:
                with socket.create_connection(address["sink"]) as sock:
                    block, began = b"x" * 65536, time.monotonic()
                    while not stop.is_set():
                        if args.pace and sent[0] > (time.monotonic() - began) * args.pace * 2**20:
                            time.sleep(0.001)
                            continue
                        sock.sendall(block)
                        sent[0] += len(block)

            threading.Thread(target=stream, daemon=True).start()
            time.sleep(1)
            before, t0 = sent[0], time.monotonic()
            time.sleep(3)
            alone = (sent[0] - before) / (time.monotonic() - t0)
            times, sizes = [], []
            before, t0 = sent[0], time.monotonic()
            for _ in range(3):
                t = time.monotonic()
                body = urllib.request.urlopen(base + "/sessions", timeout=60).read()
                times.append(time.monotonic() - t)
                sizes.append(len(body))
            during = (sent[0] - before) / (time.monotonic() - t0)
            stop.set()
            print(f"/sessions of {args.sessions}: {', '.join(f'{t:.3f}' for t in times)} s ({sizes[0]} bytes)")
            print(f"stream: {alone / 1e6:.1f} MB/s alone, {during / 1e6:.1f} MB/s during the listings "
                  f"({during / alone:.2f}x)")  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(120)
            for sock in socks:
                sock.close()


if __name__ == "__main__":
    main()
