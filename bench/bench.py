"""gsrv against socat, side by side in one run, interleaved; prints a Markdown table of medians.

Every server listens on 127.0.0.1 only; every loop is bounded; only processes this script
started are ended, by their PID. Usage: python bench/bench.py [--runs 3] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import socket as stdsocket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
import psutil
from gevent import socket
from gevent.pool import Pool

MiB = 1024 * 1024
BLOCK = bytes(range(256)) * 4096  # 1 MiB


def wait_listening(pid: int, timeout: float = 10.0, ignore: int | None = None) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port != ignore:
                return conn.laddr.ip, conn.laddr.port
        time.sleep(0.02)
    raise RuntimeError(f"pid {pid} did not listen within {timeout}s")


@dataclass
class Peer:
    """One server under test serving one command."""

    name: str
    start: Callable[[list[str]], tuple[subprocess.Popen[bytes], tuple[str, int]]]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


def start_gsrv(command: list[str], tmp: str, extra: str = "") -> tuple[subprocess.Popen[bytes], tuple[str, int]]:
    """gsrv serving command on 127.0.0.1:0; `extra` is more TOML (an [admin] table, say)."""
    config = os.path.join(tmp, "bench.toml")
    with open(config, "w") as f:
        f.write('[server]\nkill_grace = "1s"\ndrain_timeout = "1s"\n' + extra)
        f.write(f'[services.bench]\nlisten = "127.0.0.1:0"\ncommand = {command!r}\n'.replace("'", '"'))
        f.write("max_sessions = 1100\nbacklog = 2048\n")
    with open(os.path.join(tmp, "gsrv.log"), "w") as log:
        argv = [sys.executable, "-m", "gsrv", "serve", "-c", config]
        proc = subprocess.Popen(argv, stderr=log, stdin=subprocess.DEVNULL)
    address = wait_listening(proc.pid, ignore=admin_port(tmp) if extra else None)
    return proc, address


def admin_port(tmp: str, timeout: float = 10.0) -> int:
    return int(admin_url(tmp, timeout).rsplit(":", 1)[1])


def admin_url(tmp: str, timeout: float = 10.0) -> str:
    """The admin endpoint of the gsrv whose log is in tmp (it logs the address it bound)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(os.path.join(tmp, "gsrv.log")) as f:
            found = re.search(r"event=admin_listening address=(\S+)", f.read())
        if found:
            return "http://" + found.group(1)
        time.sleep(0.02)
    raise RuntimeError("gsrv did not report its admin address")


def free_port() -> int:
    with stdsocket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_socat(command: list[str]) -> tuple[subprocess.Popen[bytes], tuple[str, int]]:
    port = free_port()
    listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
    proc = subprocess.Popen(["socat", "-b", "65536", listen, "EXEC:" + " ".join(command)], stdin=subprocess.DEVNULL)
    return proc, wait_listening(proc.pid)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a server we started and every process below it (by PID, collected first)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=5)


# -- the measures; each returns one number -----------------------------------------------


def into_wc(addr: tuple[str, int], size: int) -> float:
    """MB/s of `size` bytes client -> child (`wc -c`), count checked."""
    sock = socket.create_connection(addr)
    view = memoryview(BLOCK)
    t0 = time.perf_counter()
    left = size
    while left:
        n = min(left, len(view))
        sock.sendall(view[:n])
        left -= n
    sock.shutdown(stdsocket.SHUT_WR)
    reply = b""
    while chunk := sock.recv(100):
        reply += chunk
    elapsed = time.perf_counter() - t0
    sock.close()
    if int(reply.split()[0]) != size:
        raise RuntimeError(f"wc -c counted {reply!r}, sent {size}")
    return size / elapsed / 1e6


def echo(addr: tuple[str, int], size: int) -> float:
    """MB/s of `size` bytes through `cat` and back, CRC checked."""
    sock = socket.create_connection(addr)
    sums = {"sent": 0, "got": 0}

    def push() -> None:
        left = size
        while left:
            n = min(left, len(BLOCK))
            sums["sent"] = zlib.crc32(BLOCK[:n], sums["sent"])
            sock.sendall(BLOCK[:n])
            left -= n
        sock.shutdown(stdsocket.SHUT_WR)

    t0 = time.perf_counter()
    sender = gevent.spawn(push)
    got = 0
    while chunk := sock.recv(256 * 1024):
        sums["got"] = zlib.crc32(chunk, sums["got"])
        got += len(chunk)
    sender.get()
    elapsed = time.perf_counter() - t0
    sock.close()
    if got != size or sums["got"] != sums["sent"]:
        raise RuntimeError(f"echo returned {got} bytes, crc {sums['got']:x} vs {sums['sent']:x}")
    return size / elapsed / 1e6


def sessions_per_s(addr: tuple[str, int], count: int = 2000, concurrency: int = 20) -> float:
    """Sessions/s of 10 bytes into `wc -c`, `concurrency` at a time, every reply checked."""

    def one(_: int) -> None:
        sock = socket.create_connection(addr)
        sock.sendall(b"0123456789")
        sock.shutdown(stdsocket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(100):
            reply += chunk
        sock.close()
        if reply.split()[0] != b"10":
            raise RuntimeError(f"wc -c answered {reply!r}")

    pool = Pool(concurrency)
    t0 = time.perf_counter()
    for _ in pool.imap_unordered(one, range(count)):
        pass
    return count / (time.perf_counter() - t0)


def server_memory(pid: int) -> int:
    """PSS of the server's own processes (not the commands they run), in bytes."""
    root = psutil.Process(pid)
    total = 0
    for p in [root] + root.children(recursive=True):
        try:
            if p.name() in ("sleep", "wc", "cat"):
                continue
            total += p.memory_full_info().pss
        except psutil.NoSuchProcess:
            pass
    return total


def stalled(addr: tuple[str, int], pid: int, count: int = 1000) -> float:
    """KB of server memory per stalled session: child `sleep 60`, clients pushing until blocked."""
    before = server_memory(pid)
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(addr))
        for s in socks:
            s.setblocking(False)
        deadline = time.monotonic() + 120
        pushing = list(socks)
        while pushing and time.monotonic() < deadline:  # push until every connection is blocked
            still = []
            for s in pushing:
                try:
                    for _ in range(64):
                        s.send(BLOCK[:65536])
                    still.append(s)
                except BlockingIOError:
                    pass
            pushing = still
            gevent.sleep(0.05)
        gevent.sleep(2)  # let the server settle: every session read what it will
        after = server_memory(pid)
    finally:
        for s in socks:
            s.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            s.close()
    return (after - before) / count / 1000


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1] for line in f if line.startswith("model name")]
    return re.sub(r"\s+", " ", names[0]) if names else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024, help="bytes per throughput run (MiB)")
    parser.add_argument("--stalled", type=int, default=1000)
    args = parser.parse_args()
    if not shutil.which("socat"):
        print("Error: socat is not installed (apt-get install socat)", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    size = args.size_mib * MiB
    tmp = tempfile.mkdtemp(prefix="gsrv-bench-")
    peers = {"gsrv": lambda cmd: start_gsrv(cmd, tmp), "socat": start_socat}
    measures: list[tuple[str, str, list[str], Callable[[tuple[str, int], int], float]]] = [
        (f"client→child, {args.size_mib} MiB into wc -c", "MB/s", ["wc", "-c"], lambda a, p: into_wc(a, size)),
        (f"echo through cat, {args.size_mib} MiB", "MB/s", ["cat"], lambda a, p: echo(a, size)),
        ("sessions/s, 2,000 × 10 B into wc -c, 20 at a time", "1/s", ["wc", "-c"], lambda a, p: sessions_per_s(a)),
        (f"server memory per stalled session ({args.stalled}, sleep 60)", "KB", ["sleep", "60"],
         lambda a, p: stalled(a, p, args.stalled)),
    ]  # fmt: skip
    results: dict[tuple[str, str], list[float]] = {}
    for title, _unit, command, measure in measures:
        for run in range(args.runs):
            for name, start in peers.items():  # interleaved: gsrv, socat, gsrv, socat, ...
                proc, addr = start(command)
                try:
                    value = measure(addr, proc.pid)
                finally:
                    stop(proc)
                results.setdefault((title, name), []).append(value)
                print(f"  {title} | {name} run {run + 1}: {value:,.1f}", file=sys.stderr, flush=True)
    cpu = cpu_model()
    print(f"\n{os.cpu_count()} CPUs ({cpu.strip()}), Linux {os.uname().release}, Python {sys.version.split()[0]}, "
          f"{time.strftime('%Y-%m-%d')}; medians of {args.runs}\n")  # fmt: skip
    print("| measure | unit | gsrv | socat -b 65536 | gsrv / socat |")
    print("|---|---|---:|---:|---:|")
    for title, unit, _command, _measure in measures:
        ours = statistics.median(results[(title, "gsrv")])
        theirs = statistics.median(results[(title, "socat")])
        print(f"| {title} | {unit} | {ours:,.1f} | {theirs:,.1f} | {ours / theirs:.2f} |")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
