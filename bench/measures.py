"""The benchmark's measures: each takes the server's address and pid and returns its figures.
Every loop is bounded in count and time; traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
import zlib
from typing import Any

import gevent
import psutil
from gevent import socket
from gevent.pool import Pool
from servers import CpuMeter, server_memory

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1024 * 1024
BLOCK = bytes(range(256)) * 4096  # 1 MiB
SHUT_WR = 1
WARM_UP = 10


def _watch_cpu(pid: int) -> tuple[CpuMeter, gevent.Greenlet]:
    meter = CpuMeter(pid)

    def loop() -> None:
        while True:
            gevent.sleep(0.02)
            meter.sample()

    return meter, gevent.spawn(loop)


def busy(t: psutil._common.scputimes) -> float:  # type: ignore[name-defined]
    """The CPU seconds of psutil.cpu_times() that some core was busy (the whole machine)."""
    return float(t.user + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def into_wc(addr: tuple[str, int], pid: int, size: int) -> dict[str, float]:
    """MB/s of `size` bytes client -> child (`wc -c`), count checked; server CPU s/GiB."""
    meter, watcher = _watch_cpu(pid)
    sock = socket.create_connection(addr, timeout=120)
    view = memoryview(BLOCK)
    t0 = time.perf_counter()
    left = size
    while left:
        n = min(left, len(view))
        sock.sendall(view[:n])
        left -= n
    sock.shutdown(SHUT_WR)
    reply = sock.recv(100)
    meter.sample()  # while the server is still there (a fork may exit right after)
    while chunk := sock.recv(100):
        reply += chunk
    elapsed = time.perf_counter() - t0
    watcher.kill()
    sock.close()
    if int(reply.split()[0]) != size:
        raise RuntimeError(f"wc -c counted {reply!r}, sent {size}")
    return {"MB/s": size / elapsed / 1e6, "CPU s/GiB": meter.seconds() / (size / 2**30)}


def echo(addr: tuple[str, int], pid: int, size: int) -> dict[str, float]:
    """MB/s of `size` bytes through `cat` and back, CRC-32 checked; server CPU s/GiB.

    The client must not be the bottleneck: the expected CRC is computed before the clock
    starts, and replies land in one reused buffer (a fresh 256 KiB per recv page-faults)."""
    expected = 0
    for offset in range(0, size, len(BLOCK)):
        expected = zlib.crc32(BLOCK[: min(len(BLOCK), size - offset)], expected)
    meter, watcher = _watch_cpu(pid)
    sock = socket.create_connection(addr, timeout=120)

    def push() -> None:
        left = size
        view = memoryview(BLOCK)
        while left:
            n = min(left, len(view))
            sock.sendall(view[:n])
            left -= n
        sock.shutdown(SHUT_WR)

    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    t0 = time.perf_counter()
    sender = gevent.spawn(push)
    got = crc = 0
    while n := sock.recv_into(buf):
        crc = zlib.crc32(view[:n], crc)
        got += n
        if got >= size:
            meter.sample()  # the last bytes are in: sample before the server ends
    sender.get()
    elapsed = time.perf_counter() - t0
    watcher.kill()
    sock.close()
    if got != size or crc != expected:
        raise RuntimeError(f"echo returned {got} bytes, crc {crc:x} vs {expected:x}")
    return {"MB/s": size / elapsed / 1e6, "CPU s/GiB": meter.seconds() / (size / 2**30)}


def slow_child(addr: tuple[str, int], pid: int, seconds: float, rss_cap: int) -> dict[str, Any]:
    """The client pushes as fast as it can at a child reading ~6 MB/s, for `seconds`: the
    server's RSS over time. Stops early (and says so) past rss_cap: an unbounded server."""
    base = server_memory(pid, "rss")
    sock = socket.create_connection(addr, timeout=30)
    series: list[tuple[float, float]] = []
    capped = {"hit": False}
    t0 = time.monotonic()

    def push() -> None:
        try:
            while time.monotonic() - t0 < seconds and not capped["hit"]:
                sock.sendall(BLOCK[:65536])
        except OSError:
            pass  # the server gave up on the session: its RSS figures say what it held

    pusher = gevent.spawn(push)
    while time.monotonic() - t0 < seconds and not capped["hit"]:
        grown = server_memory(pid, "rss") - base
        series.append((time.monotonic() - t0, grown / MiB))
        capped["hit"] = grown > rss_cap
        gevent.sleep(0.25)
    pusher.kill()
    sock.close()
    return {"peak MiB": max(v for _, v in series), "series": series, "capped": capped["hit"]}


def stalled(addr: tuple[str, int], pid: int, count: int, per_conn_cap: int) -> dict[str, float]:
    """Server memory (PSS) and whole-machine memory (MemAvailable) per stalled session: the
    child (`sleep`) never reads, each client pushes until blocked (at most per_conn_cap)."""
    before, machine_before = server_memory(pid), psutil.virtual_memory().available
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(addr, timeout=30))
        for s in socks:
            s.setblocking(False)
        pushed = dict.fromkeys(range(count), 0)
        pushing = list(range(count))
        deadline = time.monotonic() + 120
        while pushing and time.monotonic() < deadline:
            still = []
            for i in pushing:
                try:
                    for _ in range(16):
                        pushed[i] += socks[i].send(BLOCK[:65536])
                        if pushed[i] >= per_conn_cap:
                            break
                    if pushed[i] < per_conn_cap:
                        still.append(i)
                except BlockingIOError:
                    pass
            pushing = still
            gevent.sleep(0.05)
        gevent.sleep(2)  # let the server settle: every session read what it will
        after, machine_after = server_memory(pid), psutil.virtual_memory().available
    finally:
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            s.close()
    return {"server KB": (after - before) / count / 1000, "machine KB": (machine_before - machine_after) / count / 1000}


def _ten_bytes(addr: tuple[str, int]) -> bytes:
    """One short session: connect, send 10 bytes, half-close, read the whole reply."""
    sock = socket.create_connection(addr, timeout=30)
    sock.sendall(b"0123456789")
    sock.shutdown(SHUT_WR)
    reply = b""
    while chunk := sock.recv(100):
        reply += chunk
    sock.close()
    return reply


def sessions_per_s(addr: tuple[str, int], pid: int, count: int, concurrency: int = 20) -> dict[str, float]:
    """Sessions/s of 10 bytes into `wc -c`, `concurrency` at a time, every reply checked."""

    def one(_: int) -> None:
        reply = _ten_bytes(addr)
        if reply.split()[0] != b"10":
            raise RuntimeError(f"wc -c answered {reply!r}")

    pool = Pool(concurrency)
    t0 = time.perf_counter()
    for _ in pool.imap_unordered(one, range(count)):
        pass
    return {"sessions/s": count / (time.perf_counter() - t0)}


def _descendants(pid: int) -> int:
    try:
        return len(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return 0


def sessions_beside_held(addr: tuple[str, int], pid: int, count: int, held: int) -> dict[str, float]:
    """Sessions/s as in sessions_per_s while `held` other sessions stay open (their clients
    send nothing; their children wait on stdin)."""
    socks = []
    try:
        for _ in range(held):
            socks.append(socket.create_connection(addr, timeout=30))
        deadline = time.monotonic() + 60
        while _descendants(pid) < held and time.monotonic() < deadline:
            gevent.sleep(0.1)  # every held session has its child
        if _descendants(pid) < held:
            raise RuntimeError(f"only {_descendants(pid)} of {held} held sessions started within 60 s")
        return sessions_per_s(addr, pid, count)
    finally:
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            s.close()


def latency(addr: tuple[str, int], pid: int, count: int, beside_stream: bool) -> dict[str, float]:
    """p50/p99 ms of one 10-byte session through `cat` (connect to last byte back), `count`
    in a row after WARM_UP unmeasured ones; with beside_stream, while another client
    streams flat out through the same service (bench/peers/stream_client.py, a separate
    process that gives up after 300 s)."""
    streamer = None
    if beside_stream:
        script = os.path.join(HERE, "peers", "stream_client.py")
        streamer = subprocess.Popen([sys.executable, script, addr[0], str(addr[1]), "300"],
                                    stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        if streamer is not None:
            assert streamer.stdout is not None
            if streamer.stdout.readline() != b"streaming\n":
                raise RuntimeError("the streaming client did not start")
            gevent.sleep(0.5)
        times = []
        for i in range(count + WARM_UP):
            t0 = time.perf_counter()
            reply = _ten_bytes(addr)
            if i >= WARM_UP:
                times.append((time.perf_counter() - t0) * 1000)
            if reply != b"0123456789":
                raise RuntimeError(f"cat answered {reply!r}")
        if streamer is not None and streamer.poll() is not None:
            raise RuntimeError("the streaming client stopped before the measure ended")
    finally:
        if streamer is not None:
            streamer.kill()
            streamer.wait(timeout=10)
    return {"p50 ms": statistics.median(times), "p99 ms": statistics.quantiles(times, n=100)[98]}


def httpd_ab(addr: tuple[str, int], pid: int, count: int, concurrency: int = 20) -> dict[str, float]:
    """busybox `httpd -i` (a real inetd server) driven by ApacheBench: requests/s of `count`
    GETs of a 1 KiB page, `concurrency` at a time, one connection (one session) each."""
    url = f"http://{addr[0]}:{addr[1]}/index.html"
    run = subprocess.run(["ab", "-q", "-n", str(count), "-c", str(concurrency), "-s", "30", url],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    rate = re.search(r"Requests per second:\s+([\d.]+)", run.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", run.stdout)
    complete = re.search(r"Complete requests:\s+(\d+)", run.stdout)
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", run.stdout)
    if run.returncode != 0 or not (rate and failed and complete):
        raise RuntimeError(f"ab failed ({run.returncode}): {(run.stderr or run.stdout)[-300:]}")
    lost = count - int(complete.group(1)) + int(failed.group(1)) + (int(non_2xx.group(1)) if non_2xx else 0)
    return {"req/s": float(rate.group(1)), "lost": float(lost)}  # lost: not answered, or not with a 200


def half_close(addr: tuple[str, int], pid: int) -> dict[str, float]:
    """The child answers 1 s after stdin EOF: is the answer delivered to a half-closed client?"""
    sock = socket.create_connection(addr, timeout=10)
    sock.sendall(b"question\n")
    sock.shutdown(SHUT_WR)
    reply = b""
    try:
        while chunk := sock.recv(100):
            reply += chunk
    except OSError:
        pass
    sock.close()
    return {"delivered": 1.0 if reply == b"answer\n" else 0.0}
