"""A WebSocket session beside the raw TCP path, on one gsrv: binary-mode throughput (an echo
through `cat`, 64 KiB messages) and sessions/s (10 bytes into `wc -c`, 20 at a time), with
gsrv's own CPU for each, in interleaved rounds. The clients: asyncio streams for TCP and the
`websockets` library (asyncio) for WebSocket, both in this process.

Usage: python bench/websocket.py [--rounds 3] [--mib 256] [--sessions 1000] [--out bench/results/websocket.md]
Traffic stays on 127.0.0.1; the script ends only the gsrv it started, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import psutil
from websockets.asyncio.client import connect

MiB = 1024 * 1024
CONFIG = """[server]
kill_grace = "1s"
drain_timeout = "1s"
[services.tcp]
listen = "127.0.0.1:0"
command = ["cat"]
kill_scope = "group"
max_sessions = 100
[services.ws]
listen = "127.0.0.1:0"
command = ["cat"]
kill_scope = "group"
max_sessions = 100
transport = "websocket"
websocket = { messages = "binary" }
[services.tcp_wc]
listen = "127.0.0.1:0"
command = ["wc", "-c"]
kill_scope = "group"
max_sessions = 100
[services.ws_wc]
listen = "127.0.0.1:0"
command = ["wc", "-c"]
kill_scope = "group"
max_sessions = 100
transport = "websocket"
websocket = { messages = "binary" }
"""


def start(tmp: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    path = os.path.join(tmp, "ws.toml")
    with open(path, "w") as f:
        f.write(CONFIG)
    log = open(os.path.join(tmp, "gsrv.log"), "w+")  # noqa: SIM115 (the process writes it)
    proc = subprocess.Popen([sys.executable, "-m", "gsrv", "serve", "-c", path], stderr=log)
    ports: dict[str, int] = {}
    deadline = time.monotonic() + 20
    while len(ports) < 4:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"gsrv did not start; its log is {log.name}")
        time.sleep(0.05)
        log.seek(0)
        found = re.findall(r"event=listening service=(\w+) address=127\.0\.0\.1:(\d+)", log.read())
        ports = {name: int(port) for name, port in found}
    return proc, ports


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def tcp_echo(port: int, total: int, block: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MiB)
    got = hashlib.sha256()

    async def send() -> None:
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = 0
    while chunk := await reader.read(MiB):
        got.update(chunk)
        received += len(chunk)
    await sender
    writer.close()
    assert received == total, (received, total)


async def ws_echo(port: int, total: int, block: bytes) -> None:
    async with connect(f"ws://127.0.0.1:{port}/", max_size=None, compression=None) as ws:

        async def send() -> None:
            for _ in range(total // len(block)):
                await ws.send(block)

        sender = asyncio.create_task(send())
        received = 0
        while received < total:
            received += len(await ws.recv())
        await sender
        await ws.close()
    assert received == total, (received, total)


async def tcp_short(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"0123456789")
    writer.write_eof()
    reply = await reader.read()
    writer.close()
    assert reply.strip() == b"10", reply


async def ws_short(port: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/", compression=None, ping_interval=None) as ws:
        await ws.send(b"0123456789")
        await ws.close()  # the client's close frame is the child's EOF; gsrv's answers after wc exits
    # (wc's reply, if it came before the close, was dropped by the client: the close code is what counts)
    assert ws.close_code == 1000, ws.close_code


async def many(run, port: int, sessions: int, concurrency: int = 20) -> None:  # type: ignore[no-untyped-def]
    queue = iter(range(sessions))

    async def worker() -> None:
        for _ in queue:
            await run(port)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def measure(gsrv: psutil.Process, work) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(seconds, gsrv CPU seconds) of one piece of work."""
    before, started = cpu(gsrv), time.perf_counter()
    asyncio.run(work)
    return time.perf_counter() - started, cpu(gsrv) - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    block = os.urandom(64 * 1024)
    total = args.mib * MiB
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in ("tcp_mb", "ws_mb", "tcp_s", "ws_s")}
    with tempfile.TemporaryDirectory() as tmp:
        proc, ports = start(tmp)
        gsrv = psutil.Process(proc.pid)
        try:
            for _ in range(args.rounds):  # interleaved: the machine's noise hits both alike
                rows["tcp_mb"].append(measure(gsrv, tcp_echo(ports["tcp"], total, block)))
                rows["ws_mb"].append(measure(gsrv, ws_echo(ports["ws"], total, block)))
                rows["tcp_s"].append(measure(gsrv, many(tcp_short, ports["tcp_wc"], args.sessions)))
                rows["ws_s"].append(measure(gsrv, many(ws_short, ports["ws_wc"], args.sessions)))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    mb = {k: [total / 1e6 / s for s, _ in rows[k]] for k in ("tcp_mb", "ws_mb")}
    gib = {k: [c / (total / 2**30) for _, c in rows[k]] for k in ("tcp_mb", "ws_mb")}
    rate = {k: [args.sessions / s for s, _ in rows[k]] for k in ("tcp_s", "ws_s")}
    per = {k: [c * 1000 / args.sessions for _, c in rows[k]] for k in ("tcp_s", "ws_s")}

    def cell(values: list[float], digits: int = 0) -> str:
        return f"{statistics.median(values):,.{digits}f} ({', '.join(f'{v:,.{digits}f}' for v in values)})"

    lines = [
        "# WebSocket beside raw TCP (bench/websocket.py)",
        "",
        f"{args.rounds} interleaved rounds; median (each round). Echo: {args.mib} MiB through `cat` both ways "
        f"(WebSocket: binary messages of 64 KiB); sessions: {args.sessions} x 10 bytes into `wc -c`, 20 at a time.",
        "",
        "| measure | raw TCP (splice) | WebSocket (binary) | ratio |",
        "|---|---|---|---|",
        f"| echo MB/s | {cell(mb['tcp_mb'])} | {cell(mb['ws_mb'])} | "
        f"{statistics.median(mb['ws_mb']) / statistics.median(mb['tcp_mb']):.2f} |",
        f"| gsrv CPU s per GiB echoed | {cell(gib['tcp_mb'], 2)} | {cell(gib['ws_mb'], 2)} | "
        f"{statistics.median(gib['ws_mb']) / statistics.median(gib['tcp_mb']):.1f} |",
        f"| sessions/s | {cell(rate['tcp_s'])} | {cell(rate['ws_s'])} | "
        f"{statistics.median(rate['ws_s']) / statistics.median(rate['tcp_s']):.2f} |",
        f"| gsrv CPU ms per session | {cell(per['tcp_s'], 2)} | {cell(per['ws_s'], 2)} | "
        f"{statistics.median(per['ws_s']) / statistics.median(per['tcp_s']):.1f} |",
        "",
        "The clients run on the same 2 cores as gsrv and its children (Python asyncio both; the",
        "`websockets` client masks every frame it sends, as RFC 6455 requires of clients).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
