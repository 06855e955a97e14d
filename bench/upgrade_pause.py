"""`gsrv upgrade` (issue 38): what an upgrade costs the sessions it moves.

1. The pause against the number of sessions: N stalled socket-handoff sessions (`sleep`), and
   two probes through the same gsrv, a socket-handoff `cat` and a splice `cat`, each echoing a
   byte every 5 ms; one upgrade; the upgrade's total time (the CLI's, asked to answered), its
   parts from the log (settled_ms: the check and the settle; exec_ms: the exec to serving) and
   each probe's largest gap between echoes (the pause a session saw).
2. With --stream: a paced 1 GiB (--rate MB/s) through `cat` on each path (socket, splice,
   copy) with three upgrades during it: sha256 both ways, the child's pid and gsrv's pid
   unchanged, one session_end line with the whole session's bytes, the largest gap.

3. With --load: `gsrv load`'s capacity against a `sha256sum` service (sessions/s, 64 KiB each),
   then `gsrv load` at half of it across five upgrades: failed sessions and errors.

Usage: python bench/upgrade_pause.py [--sessions 100,1000,10000] [--stream] [--rate 50] [--load]
Traffic stays on 127.0.0.1; the script ends only the gsrv it started, by PID.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psutil
from serving import serve

STALLED = """[server]
upgrade_wait = "5s"
[admin]
listen = "127.0.0.1:0"
[services.stall]
listen = "127.0.0.1:0"
command = ["sleep", "600"]
relay = "socket"
stderr = "discard"
kill_scope = "group"
max_sessions = {most}
backlog = 4096
[services.handed]
listen = "127.0.0.1:0"
command = ["cat"]
relay = "socket"
kill_scope = "group"
[services.piped]
listen = "127.0.0.1:0"
command = ["cat"]
relay = "splice"
kill_scope = "group"
[services.copied]
listen = "127.0.0.1:0"
command = ["cat"]
relay = "copy"
kill_scope = "group"
"""
SERVICES = 5  # the addresses serve() waits for: four services and the admin listener
STREAM_PATHS = {"socket": "handed", "splice": "piped", "copy": "copied"}


class Probe:
    """A byte every 5 ms through a `cat` session, echoed: the largest gap between echoes."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address)
        self.largest = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            self.sock.sendall(b".")
            if self.sock.recv(1) != b".":
                raise SystemExit("a probe lost its echo")
            now = time.monotonic()
            self.largest = max(self.largest, now - last)
            last = now
            time.sleep(0.005)

    def reset(self) -> None:
        self.largest = 0.0

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.sock.close()


def upgrade(config: str, admin: tuple[str, int]) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "gsrv", "upgrade", "-c", config, "--admin", "{}:{}".format(*admin)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"the upgrade failed: {done.stdout} {done.stderr}")
    return time.monotonic() - started, done.stdout.strip()


def last_upgrade(log_path: str) -> dict[str, str]:
    with open(log_path) as log:
        lines = [line for line in log if "event=upgrade upgrade=" in line]
    return dict(re.findall(r"(\w+)=(\S+)", lines[-1]))


def pause_against_sessions(counts: list[int]) -> list[dict[str, object]]:
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            proc, address, log_path = serve(tmp, STALLED.format(most=count + 10), SERVICES)
            socks: list[socket.socket] = []
            probes: list[Probe] = []
            try:
                socks = [socket.create_connection(address["stall"]) for _ in range(count)]
                base = "http://{}:{}".format(*address["admin"])
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    services = json.load(urllib.request.urlopen(base + "/services", timeout=60))["services"]
                    if next(s for s in services if s["name"] == "stall")["sessions"] >= count:
                        break
                    time.sleep(0.5)
                probes = [Probe(address["handed"]), Probe(address["piped"])]
                time.sleep(1)
                rss = psutil.Process(proc.pid).memory_info().rss
                for probe in probes:
                    probe.reset()
                took, _said = upgrade(f"{tmp}/gsrv.toml", address["admin"])
                time.sleep(0.5)
                line = last_upgrade(log_path)
                row = {"sessions": count, "upgrade_s": round(took, 2), "settled_ms": float(line["settled_ms"]),
                       "exec_ms": float(line["exec_ms"]), "moved": int(line["moved"]),
                       "socket_gap_ms": round(probes[0].largest * 1000, 1),
                       "splice_gap_ms": round(probes[1].largest * 1000, 1),
                       "rss_mib": round(rss / 2**20, 1),
                       "rss_after_mib": round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
            finally:
                for probe in probes:
                    probe.close()
                for sock in socks:
                    sock.close()
                proc.terminate()
                proc.wait(timeout=120)
    return rows


def stream_across_upgrades(rate_mb: float, total: int) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, address, log_path = serve(tmp, STALLED.format(most=10), SERVICES)
        try:
            for path, service in STREAM_PATHS.items():
                rows.append(_stream(tmp, proc.pid, address, log_path, path, service, rate_mb, total))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    return rows


def _stream(tmp: str, pid: int, address: dict[str, tuple[str, int]], log_path: str, path: str, service: str,
            rate_mb: float, total: int) -> dict[str, object]:  # fmt: skip
    sock = socket.create_connection(address[service])
    sent, got = hashlib.sha256(), hashlib.sha256()
    counts = {"sent": 0, "got": 0}
    largest = [0.0]
    block = hashlib.shake_256(path.encode()).digest(65536)

    def send() -> None:
        began = time.monotonic()
        n = 0
        while counts["sent"] < total:
            piece = n.to_bytes(8, "big") + block[8 : min(65536, total - counts["sent"])]
            n += 1
            due = began + counts["sent"] / (rate_mb * 1e6)
            time.sleep(max(0.0, due - time.monotonic()))
            sock.sendall(piece)
            sent.update(piece)
            counts["sent"] += len(piece)
        sock.shutdown(socket.SHUT_WR)

    def receive() -> None:
        last = time.monotonic()
        while data := sock.recv(1 << 20):
            now = time.monotonic()
            largest[0] = max(largest[0], now - last)
            last = now
            got.update(data)
            counts["got"] += len(data)

    sender, receiver = threading.Thread(target=send), threading.Thread(target=receive)
    sender.start()
    receiver.start()
    base = "http://{}:{}".format(*address["admin"])
    time.sleep(1)
    listed = json.load(urllib.request.urlopen(f"{base}/sessions?service={service}", timeout=60))["sessions"]
    child = listed[0]["pid"]
    seconds = total / (rate_mb * 1e6)
    for n in range(3):  # at a quarter, a half and three quarters of the stream
        time.sleep(max(0.0, seconds / 4 - (2 if n else 1)))
        upgrade(f"{tmp}/gsrv.toml", address["admin"])
        listed = json.load(urllib.request.urlopen(f"{base}/sessions?service={service}", timeout=60))["sessions"]
        if [s["pid"] for s in listed] != [child]:
            raise SystemExit(f"{path}: the child changed: {listed}")
    sender.join()
    receiver.join()
    sock.close()
    time.sleep(1)
    with open(log_path) as log:
        ends = [line for line in log if f"event=session_end service={service} " in line]
    return {"path": path, "bytes": counts["sent"], "exact": sent.digest() == got.digest() and counts["got"] == total,
            "same_child": True, "same_gsrv": psutil.pid_exists(pid), "session_end_lines": len(ends),
            "whole_bytes_in_line": f"bytes_in={total} bytes_out={total}" in ends[-1] if ends else False,
            "largest_gap_ms": round(largest[0] * 1000, 1)}  # fmt: skip


def load_across_upgrades() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        config = STALLED.format(most=10) + '[services.sum]\nlisten = "127.0.0.1:0"\ncommand = ["sha256sum"]\n'
        proc, address, log_path = serve(tmp, config, SERVICES + 1)
        target = "{}:{}".format(*address["sum"])
        load = [sys.executable, "-m", "gsrv", "load", target, "--concurrency", "16", "--bytes", "64KiB", "--verify",
                "--json"]  # fmt: skip
        try:
            measured = json.loads(subprocess.run([*load, "--sessions", "3000"], capture_output=True, text=True,
                                                 timeout=300).stdout)  # fmt: skip
            capacity = float(measured["sessions_per_s"])
            half = subprocess.Popen([*load, "--sessions", "1000000", "--rate", str(capacity / 2)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            took = []
            try:
                for _ in range(5):
                    time.sleep(2)
                    took.append(round(upgrade(f"{tmp}/gsrv.toml", address["admin"])[0], 2))
                time.sleep(2)
            finally:
                half.send_signal(2)
                out, _err = half.communicate(timeout=120)
            report = json.loads(out)
            row = {"capacity_per_s": round(capacity, 1), "rate_per_s": round(capacity / 2, 1),
                   "sessions": report["sessions"], "failed": report["failed"], "errors": report["errors"],
                   "upgrades_s": took}  # fmt: skip
            print(json.dumps(row), flush=True)
            return row
        finally:
            proc.terminate()
            proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="100,1000,10000")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--rate", type=float, default=50.0, help="the paced stream's MB/s")
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--load", action="store_true")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds a socket per session
    if args.sessions:
        pause_against_sessions([int(n) for n in args.sessions.split(",")])
    if args.stream:
        stream_across_upgrades(args.rate, args.bytes)
    if args.load:
        load_across_upgrades()


if __name__ == "__main__":
    main()
