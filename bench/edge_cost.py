"""What the edge and privilege features cost, against the same gsrv without them, in one run.

One gsrv serves the same command behind each feature; sessions/s (short sessions, 20 at a
time, each client sends 10 bytes and reads them back from `head -c 10`) and, for TLS,
upload throughput into `head -c N | wc -c` with gsrv's CPU per GiB. Runs interleaved, medians printed
with min-max, and each figure as a ratio to the plain service. Manual:

    .venv/bin/python bench/edge_cost.py [--runs 3] [--sessions 2000]

`user` needs root; TLS needs trustme (the test extra) to make a certificate.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ECHO10 = '["head", "-c", "10"]'
UPLOAD = 256 * 1024 * 1024


def _v2_header() -> bytes:
    body = socket.inet_aton("203.0.113.7") + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 4242, 1)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def _config(where: Path, tls: dict[str, str] | None) -> tuple[str, list[str]]:
    services = {
        "plain": "",
        "rlimits": 'rlimits = { nofile = 1024, as = "2GiB", cpu = "60s", fsize = "1GiB", nproc = 4096 }\n',
        "umask": 'umask = "0027"\n',
        "proxy_v2": 'proxy_protocol = "v2"\nproxy_trusted = ["127.0.0.1"]\n',
        "rules": 'allow = ["127.0.0.0/8"]\ndeny = ["10.0.0.0/8"]\nmax_sessions_per_ip = 1000\nrate_per_ip = 100000\n',
    }
    if os.geteuid() == 0:
        services["user"] = 'user = "nobody"\n'
        services["user_rlimits"] = services["user"] + services["rlimits"]
    if tls:
        services["tls"] = f'tls = {{ cert = "{tls["cert"]}", key = "{tls["key"]}" }}\n'
    text = '[server]\nlog_level = "warning"\n'
    for name, extra in services.items():
        text += f'[services.{name}]\nlisten = "127.0.0.1:0"\ncommand = {ECHO10}\ncwd = "/"\nmax_sessions = 64\n{extra}'
    for name, extra in (("plain_up", 'relay = "copy"\n'), ("tls_up", services.get("tls"))):
        if extra:
            wc = f'["sh", "-c", "head -c {UPLOAD} | wc -c"]'  # ends without the client's close_notify
            text += f'[services.{name}]\nlisten = "127.0.0.1:0"\ncommand = {wc}\ncwd = "/"\n{extra}'
    return text, list(services)


class Server:
    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "gsrv", "serve", "-c", str(config),
                                      "--set", "server.log_level=info"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        self.addresses: dict[str, tuple[str, int]] = {}
        assert self.proc.stderr is not None
        want = len(re.findall(r"^\[services\.", config.read_text(), re.M))
        for raw in self.proc.stderr:
            line = raw.decode()
            m = re.search(r"event=listening service=(\S+) address=(\S+):(\d+)", line)
            if m:
                self.addresses[m[1]] = (m[2], int(m[3]))
            if len(self.addresses) == want:
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stderr or ()], daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _session(addr: tuple[str, int], kind: str, context: ssl.SSLContext | None) -> None:
    sock: socket.socket = socket.create_connection(addr, timeout=30)
    try:
        if kind == "proxy_v2":
            sock.sendall(_v2_header())
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        sock.sendall(b"0123456789")
        got = b""
        while chunk := sock.recv(100):
            got += chunk
        assert got == b"0123456789", got
    finally:
        sock.close()


def sessions_per_s(addr: tuple[str, int], kind: str, count: int, context: ssl.SSLContext | None) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda _: _session(addr, kind, context), range(count)))
    return count / (time.perf_counter() - started)


def upload(addr: tuple[str, int], pid: int, context: ssl.SSLContext | None) -> tuple[float, float]:
    """MB/s and gsrv CPU s/GiB for UPLOAD bytes into wc -c."""
    block = os.urandom(1024 * 1024)
    proc = psutil.Process(pid)
    cpu0 = sum(proc.cpu_times()[:2])
    started = time.perf_counter()
    sock: socket.socket = socket.create_connection(addr, timeout=60)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    for _ in range(UPLOAD // len(block)):
        sock.sendall(block)
    reply = b""
    while chunk := sock.recv(100):
        reply += chunk
    sock.close()
    took = time.perf_counter() - started
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    return UPLOAD / took / 1e6, cpu / (UPLOAD / 1024**3)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        context, tls = None, None
        try:
            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1")
            cert.cert_chain_pems[0].write_to_path(str(where / "c.pem"))
            cert.private_key_pem.write_to_path(str(where / "k.pem"))
            tls = {"cert": str(where / "c.pem"), "key": str(where / "k.pem")}
            context = ssl.create_default_context()
            ca.configure_trust(context)
        except ImportError:
            print("(no trustme: TLS left out)")
        text, kinds = _config(where, tls)
        (where / "gsrv.toml").write_text(text)
        server = Server(where / "gsrv.toml")
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        ups: dict[str, list[tuple[float, float]]] = {"plain_up": [], "tls_up": []}
        try:
            for run in range(args.runs):
                for kind in kinds:
                    ctx = context if kind == "tls" else None
                    rates[kind].append(sessions_per_s(server.addresses[kind], kind, args.sessions, ctx))
                for kind in ups:
                    if kind in server.addresses:
                        ctx = context if kind == "tls_up" else None
                        ups[kind].append(upload(server.addresses[kind], server.proc.pid, ctx))
                print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        finally:
            server.stop()
    plain = statistics.median(rates["plain"])
    print(f"\nedge cost, {args.runs} interleaved runs, {args.sessions} sessions each (`head -c 10`, 20 at a time)\n")
    print("| service | sessions/s, median (min-max) | / plain |")
    print("|---|---:|---:|")
    for kind, values in rates.items():
        med = statistics.median(values)
        print(f"| {kind} | {med:,.0f} ({min(values):,.0f}-{max(values):,.0f}) | {med / plain:.2f} |")
    if ups["tls_up"]:
        print(f"\n{UPLOAD // 2**20} MiB into wc -c, median of {args.runs}\n")
        print("| service | MB/s | gsrv CPU s/GiB |")
        print("|---|---:|---:|")
        for kind, label in (("plain_up", 'plain, relay = "copy"'), ("tls_up", "TLS (copy through OpenSSL)")):
            mbs = statistics.median(v[0] for v in ups[kind])
            cpu = statistics.median(v[1] for v in ups[kind])
            print(f"| {label} | {mbs:,.0f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
