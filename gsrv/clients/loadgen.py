"""`gsrv load HOST:PORT`: a gevent load generator for any stream service, gsrv or not.

It imports nothing from gsrv's server side (not even its size parser), so a bug cannot
hide on both sides of a test. Modes: upload (send, half-close, read the reply), echo
(send and read at once), download (read what the service sends), stall (send until
blocked, then hold).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket as stdsocket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import gevent
import psutil
from gevent import socket
from gevent.event import Event
from gevent.pool import Pool

SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
TIME_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
BLOCK = 1024 * 1024


def size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", text.strip())
    if not m or (m.group(2) and m.group(2) not in SIZE_UNITS):
        raise argparse.ArgumentTypeError(f'expected a size like 1MiB or 4096 (got "{text}")')
    return int(float(m.group(1)) * SIZE_UNITS.get(m.group(2) or "B", 1))


def duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f'expected a duration like 30s or 500ms (got "{text}")')
    return float(m.group(1)) * TIME_UNITS[m.group(2)]


Target = tuple[str, int] | str  # (host, port), or a unix socket's path


def target(text: str) -> Target:
    if text.startswith("unix:") and len(text) > len("unix:"):
        return text.removeprefix("unix:")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f'expected HOST:PORT or unix:/path, like 127.0.0.1:7001 (got "{text}")')
    return host.strip("[]"), int(port)


def connect(to: Target, timeout: float) -> socket.socket:
    if isinstance(to, str):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(timeout)
        try:
            sock.connect(to)
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection(to, timeout=timeout)


def _shown(to: Target) -> str:
    return f"unix:{to}" if isinstance(to, str) else f"{to[0]}:{to[1]}"


class VerifyError(Exception):
    """The service's answer does not match what was sent."""


@dataclass
class Run:
    """The whole run's figures; sessions update it as they end."""

    done: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    peak_rss: int = 0
    stopped: bool = False  # a signal cut the run short (no session started after it; stalls let go)
    aborted: int = 0  # sessions a second signal ended (not in `done`)

    def failed(self, kind: str, message: str) -> None:
        self.errors[kind] += 1
        self.examples.setdefault(kind, message)


class Session:
    def __init__(self, args: argparse.Namespace, number: int, block: bytes) -> None:
        self.args, self.number = args, number
        offset = (number * 7919) % BLOCK  # every session sends different bytes
        self.block = block[offset:] + block[:offset]
        self.sent = 0
        self.received = 0

    def payload(self) -> bytes:
        """The next piece to send (the block, cut to what is left)."""
        return self.block[: min(BLOCK, self.args.bytes - self.sent)]

    def send_all(self, sock: socket.socket, digest: Any) -> None:
        while self.sent < self.args.bytes:
            piece = self.payload()
            sock.sendall(piece)
            if digest is not None:
                digest.update(piece)
            self.sent += len(piece)
        sock.shutdown(stdsocket.SHUT_WR)

    def read_all(self, sock: socket.socket, digest: Any) -> bytes:
        """Everything until EOF; keeps the first 4 KiB (an upload's reply), hashes the rest."""
        head = b""
        rate = self.args.read_rate
        started = time.monotonic()
        while chunk := sock.recv(65536 if not rate else min(65536, max(1, rate // 10))):
            self.received += len(chunk)
            if len(head) < 4096:
                head += chunk[: 4096 - len(head)]
            if digest is not None:
                digest.update(chunk)
            if rate:
                ahead = self.received / rate - (time.monotonic() - started)
                if ahead > 0:
                    gevent.sleep(ahead)
        return head

    def run(self, address: Target, hold: float, stop: Event) -> None:
        with connect(address, self.args.timeout) as sock:
            if self.args.mode == "upload":
                self._upload(sock)
            elif self.args.mode == "echo":
                self._echo(sock)
            elif self.args.mode == "download":
                sock.shutdown(stdsocket.SHUT_WR)
                self.read_all(sock, None)
            else:
                self._stall(sock, hold, stop)

    def _upload(self, sock: socket.socket) -> None:
        digest = hashlib.sha256() if self.args.verify else None
        sender = gevent.spawn(self.send_all, sock, digest)
        reply = self.read_all(sock, None)
        sender.get()
        if digest is not None:
            got = reply.split()[0].decode("ascii", "replace") if reply.split() else "(empty)"
            if got != digest.hexdigest():
                local = digest.hexdigest()
                raise VerifyError(f"the sha256 reply {got[:16]}... differs from the local digest {local[:16]}...")

    def _echo(self, sock: socket.socket) -> None:
        sent, back = (hashlib.sha256(), hashlib.sha256()) if self.args.verify else (None, None)
        sender = gevent.spawn(self.send_all, sock, sent)
        self.read_all(sock, back)
        sender.get()
        if sent is not None and back is not None and (self.received != self.sent or sent.digest() != back.digest()):
            raise VerifyError(f"the echo ({self.received} bytes) differs from what was sent ({self.sent} bytes)")

    def _stall(self, sock: socket.socket, hold: float, stop: Event) -> None:
        """Send until the send buffer is full, then hold the connection open (until a stop)."""
        sock.setblocking(False)
        try:
            while True:
                self.sent += sock.send(self.block)
        except BlockingIOError:
            pass
        stop.wait(hold)


def _error_kind(e: BaseException) -> str:
    if isinstance(e, VerifyError):
        return "verify"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (TimeoutError, stdsocket.timeout)):
        return "timeout"
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return type(e).__name__


def run_load(args: argparse.Namespace, stop: Event | None = None, abort: Event | None = None) -> Run:
    """The run. Once `stop` is set (a first SIGINT/SIGTERM on the command line) no session
    starts and the running ones finish and count; once `abort` is (a second), they are ended
    and counted as aborted."""
    stop, abort = stop or Event(), abort or Event()
    block = os.urandom(BLOCK)
    result = Run()
    pool = Pool(args.concurrency)
    started = time.monotonic()
    stop_at = started + args.duration if args.duration else None
    progress = _progress(args)
    sampler = gevent.spawn(_sample_rss, args.server_pid, result) if args.server_pid else None

    def one(number: int) -> None:
        session = Session(args, number, block)
        t0 = time.monotonic()
        try:
            session.run(args.target, max(0.0, (stop_at or t0) - t0) if args.mode == "stall" else 0.0, stop)
            result.latencies.append(time.monotonic() - t0)
        except Exception as e:
            result.failed(_error_kind(e), f"session {number}: {e}")
        result.done += 1
        result.bytes_sent += session.sent
        result.bytes_received += session.received
        if progress is not None:
            progress.update(1)
            progress.set_postfix(errors=sum(result.errors.values()), refresh=False)

    for number in range(args.sessions):
        if stop.is_set() or (stop_at is not None and time.monotonic() >= stop_at):
            break
        if args.rate:
            due = started + number / args.rate
            if due > time.monotonic() and stop.wait(due - time.monotonic()):
                break
        while not pool.wait_available(timeout=0.2) and not stop.is_set():
            pass  # a slot, or a stop while every session still runs
        if stop.is_set():
            break
        pool.spawn(one, number)
    while not pool.join(timeout=0.2):
        if abort.is_set():
            result.aborted = len(pool)
            pool.kill(timeout=5)
            break
    result.stopped = stop.is_set()
    result_time = time.monotonic() - started
    if sampler is not None:
        sampler.kill()
    if progress is not None:
        progress.close()
    result.examples["_elapsed"] = f"{result_time:.6f}"
    return result


def _progress(args: argparse.Namespace) -> Any:
    if args.json or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=args.sessions, unit="session", file=sys.stderr, dynamic_ncols=True)


def _sample_rss(pid: int, result: Run) -> None:
    try:
        process = psutil.Process(pid)
        while True:
            result.peak_rss = max(result.peak_rss, process.memory_info().rss)
            gevent.sleep(0.1)
    except psutil.NoSuchProcess:
        return


def summary(args: argparse.Namespace, result: Run) -> dict[str, Any]:
    elapsed = float(result.examples.pop("_elapsed"))
    lat = sorted(result.latencies)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(len(lat) * p))] * 1000, 2) if lat else None

    moved = result.bytes_sent + result.bytes_received
    return {
        "target": _shown(args.target),
        "mode": args.mode,
        "sessions": result.done,
        "failed": sum(result.errors.values()),
        "seconds": round(elapsed, 3),
        "sessions_per_s": round(result.done / elapsed, 1) if elapsed else None,
        "mb_per_s": round(moved / elapsed / 1e6, 1) if elapsed else None,
        "bytes_sent": result.bytes_sent,
        "bytes_received": result.bytes_received,
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        "errors": dict(result.errors),
        "error_examples": result.examples,
        "server_peak_rss": result.peak_rss or None,
        "stopped_by_signal": result.stopped,
        "aborted_by_signal": result.aborted,
    }


def _print(report: dict[str, Any]) -> None:
    lat = report["latency_ms"]
    print(f"{report['sessions']} {report['mode']} sessions to {report['target']} in {report['seconds']}s: "
          f"{report['sessions_per_s']} sessions/s, {report['mb_per_s']} MB/s "
          f"(sent {report['bytes_sent']} B, received {report['bytes_received']} B)")  # fmt: skip
    print(f"latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
    if report["server_peak_rss"]:
        print(f"server peak RSS: {report['server_peak_rss'] / 2**20:.1f} MiB")
    if report["aborted_by_signal"]:
        print(f"stopped by a second signal: {report['aborted_by_signal']} running sessions ended unfinished")
    elif report["stopped_by_signal"]:
        print("stopped by a signal: no session started after it, the running ones finished")
    if report["failed"]:
        print(f"FAILED: {report['failed']} sessions", file=sys.stderr)
        for kind, count in report["errors"].items():
            print(f"  {kind}: {count} (for example {report['error_examples'][kind]})", file=sys.stderr)
    else:
        print("errors: none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="HOST:PORT|unix:/path", type=target)
    parser.add_argument("--sessions", type=int, default=100, help="sessions in all (default 100)")
    parser.add_argument("--concurrency", type=int, default=10, help="sessions at once (default 10)")
    parser.add_argument("--bytes", type=size, default=size("64KiB"), help="bytes per session, like 1MiB")
    parser.add_argument("--mode", choices=("upload", "echo", "download", "stall"), default="upload")
    parser.add_argument("--rate", type=float, default=0, help="at most this many sessions started per second")
    parser.add_argument("--duration", type=duration, default=0, help="stop starting sessions after this, like 30s")
    parser.add_argument("--read-rate", type=size, default=0, help="read at most this many bytes/s (a slow reader)")
    parser.add_argument("--verify", action="store_true", help="upload: check the sha256 reply; echo: checksum")
    parser.add_argument("--server-pid", type=int, help="sample this process's RSS and report the peak")
    parser.add_argument("--timeout", type=duration, default=duration("60s"), help="per socket operation")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def main(args: argparse.Namespace) -> int:
    stop, abort = Event(), Event()

    def on_signal() -> None:  # the first: no new session; the second: end the running ones
        (abort if stop.is_set() else stop).set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, on_signal)
    result = run_load(args, stop, abort)
    report = summary(args, result)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 1 if report["failed"] else 0
