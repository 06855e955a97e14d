"""Issue 25's measures, paired with tcpserver in one interleaved run (each round: every
server in turn, then the next round), gsrv with its shipped defaults unless said (as root:
kill_scope "auto" is "cgroup", accounting off):

- sessions/s (2,000 × 10 B into wc -c, 20 at a time): tcpserver, socat -b 65536, gsrv socket
  and splice with the defaults and with kill_scope = "group", and its server CPU per session
  (gsrv + spawner + guardian: every process of the server's but the commands);
- the same beside 1,000 held sessions, every gsrv path (splice, copy, socket), against the
  same path idle in the same round;
- busybox httpd -i under ApacheBench: tcpserver, gsrv socket, gsrv splice;
- a Python child's session latency (it imports json and decimal first), one client, sessions
  200 ms apart: prespawn = 4 against 0;
- 10 B p99 beside a client streaming flat out through cat: gsrv now against the commit
  before this issue (--before TREE: a checkout of it, run with PYTHONPATH=TREE).

Usage: python bench/cheap_sessions.py [--rounds 3] [--before /tmp/gsrv-before] [--out FILE]
Every server listens on 127.0.0.1; only processes this script started are ended.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import gevent
import measures
import psutil
import servers

HTTPD = ["busybox", "httpd", "-i", "-h", os.path.join(servers.HERE, "peers", "www")]
PYTHON_CHILD = [sys.executable, "-c", "import json, decimal, sys; sys.stdout.write(sys.stdin.read())"]
Start = Callable[[list[str], str], subprocess.Popen[bytes]]


def gsrv(service: str = "", env: dict[str, str] | None = None) -> Start:
    inner = servers.gsrv(service=service)

    def start(command: list[str], tmp: str) -> subprocess.Popen[bytes]:
        if env is None:
            return inner(command, tmp)
        old = dict(os.environ)
        os.environ.update(env)
        try:
            return inner(command, tmp)
        finally:
            os.environ.clear()
            os.environ.update(old)

    return start


def peers(before: str | None) -> dict[str, Start]:
    found: dict[str, Start] = {
        "tcpserver": servers.tcpserver,
        "socat -b 65536": servers.socat(65536),
        "gsrv socket": gsrv('relay = "socket"\n'),
        "gsrv splice": gsrv(),
        "gsrv copy": gsrv('relay = "copy"\n'),
        "gsrv socket, group": gsrv('relay = "socket"\nkill_scope = "group"\n'),
        "gsrv splice, group": gsrv('kill_scope = "group"\n'),
        "gsrv prespawn 4": gsrv("prespawn = 4\n"),
    }
    if before:
        found["gsrv before"] = gsrv(env={"PYTHONPATH": before})
    return found


def spaced_latency(addr: tuple[str, int], pid: int, count: int = 40, every: float = 0.2) -> dict[str, float]:
    """p50/p99 ms of one session (10 B in, the echo back), one client, `every` s apart."""
    times = []
    for i in range(count + 3):
        gevent.sleep(every)
        t0 = time.perf_counter()
        reply = measures._ten_bytes(addr)
        if reply != b"0123456789":
            raise RuntimeError(f"the child answered {reply!r}")
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    return {"p50 ms": statistics.median(times), "p99 ms": statistics.quantiles(times, n=100)[98]}


def _spawner(pid: int) -> psutil.Process | None:
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children():
            if servers.is_spawner(" ".join(child.cmdline())):
                return child
    return None


def _cpu(p: psutil.Process | None) -> float:
    if p is None:
        return 0.0
    with contextlib.suppress(psutil.Error):
        t = p.cpu_times()
        return float(t.user + t.system)
    return 0.0


def with_cpu(measure: Callable[[tuple[str, int], int], dict[str, float]], sessions: int) -> Callable[..., Any]:
    """The measure, and the server's CPU per session: all its processes but the commands
    (gsrv, its spawner, its guardian), and of that the spawner's alone."""

    def run(addr: tuple[str, int], pid: int) -> dict[str, float]:
        spawner = _spawner(pid)
        meter, watcher = measures._watch_cpu(pid)
        before = _cpu(spawner)
        try:
            result = measure(addr, pid)
        finally:
            watcher.kill()
            meter.sample()
        figures = {"server CPU ms/session": meter.seconds() * 1000 / sessions}
        if spawner is not None:
            figures["spawner CPU ms/session"] = (_cpu(spawner) - before) * 1000 / sessions
        return result | figures

    return run


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], Callable[..., dict[str, float]], list[str]]]:
    n = args.sessions
    rate = with_cpu(lambda a, p: measures.sessions_per_s(a, p, n), n)
    every_path = ["gsrv splice", "gsrv copy", "gsrv socket"]
    latency_peers = ["gsrv splice"] + (["gsrv before"] if args.before else [])
    return [
        ("sessions/s", ["wc", "-c"], rate, ["tcpserver", "socat -b 65536", "gsrv socket", "gsrv splice",
                                             "gsrv copy", "gsrv socket, group", "gsrv splice, group"]),
        (f"sessions/s beside {args.held} held", ["wc", "-c"],
         lambda a, p: measures.sessions_beside_held(a, p, n, args.held), every_path),
        ("httpd -i under ab", HTTPD, lambda a, p: measures.httpd_ab(a, p, n), ["tcpserver", "gsrv socket",
                                                                              "gsrv splice"]),
        ("Python child, one session per 200 ms", PYTHON_CHILD, spaced_latency, ["gsrv splice", "gsrv prespawn 4"]),
        ("10 B beside a flat-out stream", ["cat"], lambda a, p: measures.latency(a, p, 300, beside_stream=True),
         latency_peers),
    ]  # fmt: skip


def run(args: argparse.Namespace) -> dict[tuple[str, str], list[dict[str, float]]]:
    results: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    starts = peers(args.before)
    with tempfile.TemporaryDirectory(prefix="gsrv-bench-") as tmp:
        for round_ in range(args.rounds):
            for title, command, measure, names in plan(args):
                for name in names:
                    proc = starts[name](command, tmp)
                    try:
                        address = servers.wait_listening(proc.pid)
                        servers.COMMAND[:] = command
                        if name == "gsrv prespawn 4":
                            time.sleep(1.0)  # its four children started
                        result = measure(address, proc.pid)
                    except Exception as e:  # a failed measure is a row that says so
                        result = {"error": str(e)}  # type: ignore[dict-item]
                    finally:
                        servers.stop(proc)
                    results[title, name].append(result)
                    print(f"round {round_ + 1} {title} {name}: {result}", file=sys.stderr, flush=True)
    return results


def _med(results: dict[tuple[str, str], list[dict[str, float]]], title: str, name: str, key: str) -> float | None:
    values = [r[key] for r in results.get((title, name), []) if key in r]
    return statistics.median(values) if values else None


def _paired(results: dict[tuple[str, str], list[dict[str, float]]], ours: tuple[str, str], theirs: tuple[str, str],
            key: str) -> list[float]:  # fmt: skip
    return [a[key] / b[key] for a, b in zip(results.get(ours, []), results.get(theirs, []), strict=False)
            if key in a and key in b and b[key]]  # fmt: skip


def report(args: argparse.Namespace, results: dict[tuple[str, str], list[dict[str, float]]]) -> str:
    lines = [f"# Cheap sessions (issue 25): {args.rounds} interleaved rounds, {time.strftime('%Y-%m-%d')}", "",
             "| measure | server | figures (median of the rounds) |", "|---|---|---|"]  # fmt: skip
    for (title, name), runs in results.items():
        keys = sorted({k for r in runs for k in r if k != "error"})
        cells = ", ".join(f"{k} {_med(results, title, name, k):,.3g}" for k in keys)
        errors = [r["error"] for r in runs if "error" in r]
        lines.append(f"| {title} | {name} | {cells}{' errors: ' + '; '.join(map(str, errors)) if errors else ''} |")
    titles = [t for t, *_ in plan(args)]

    def row(name: str, ours: tuple[str, str], theirs: tuple[str, str], key: str, target: str,
            check: Callable[[float], bool]) -> str:  # fmt: skip
        ratios = _paired(results, ours, theirs, key)
        if not ratios:
            return f"| {name} | — | {target} | — |"
        med = statistics.median(ratios)
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}"
        return f"| {name} | {med:.2f}× ({spread}) | {target} | {'hit' if check(med) else 'missed'} |"

    rate, held, httpd, python, stream = titles
    lines += ["", "| target | paired ratio, median (min–max) | target | |", "|---|---:|---|---|",
              row("sessions/s, socket, defaults / tcpserver", (rate, "gsrv socket"), (rate, "tcpserver"),
                  "sessions/s", "≥ 0.8×", lambda r: r >= 0.8),
              row("sessions/s, splice, defaults / tcpserver", (rate, "gsrv splice"), (rate, "tcpserver"),
                  "sessions/s", "≥ 0.7×", lambda r: r >= 0.7),
              row("containment: splice defaults / kill_scope group", (rate, "gsrv splice"),
                  (rate, "gsrv splice, group"), "sessions/s", "≥ 0.9×", lambda r: r >= 0.9),
              row("containment: socket defaults / kill_scope group", (rate, "gsrv socket"),
                  (rate, "gsrv socket, group"), "sessions/s", "≥ 0.9×", lambda r: r >= 0.9)]  # fmt: skip
    for path in ("gsrv splice", "gsrv copy", "gsrv socket"):
        lines.append(row(f"beside {args.held} held / idle, {path}", (held, path), (rate, path), "sessions/s",
                         "≥ 0.9×", lambda r: r >= 0.9))  # fmt: skip
    lines += [row("httpd -i req/s, socket / tcpserver", (httpd, "gsrv socket"), (httpd, "tcpserver"), "req/s",
                  "≥ 0.8×", lambda r: r >= 0.8),
              row("httpd -i req/s, splice / tcpserver", (httpd, "gsrv splice"), (httpd, "tcpserver"), "req/s",
                  "≥ 0.7×", lambda r: r >= 0.7),
              row("Python child p50, prespawn 4 / 0", (python, "gsrv prespawn 4"), (python, "gsrv splice"), "p50 ms",
                  "≤ 0.2×", lambda r: r <= 0.2),
              row("10 B p99 beside a stream, now / before", (stream, "gsrv splice"), (stream, "gsrv before"),
                  "p99 ms", "≤ 1.1×", lambda r: r <= 1.1)]  # fmt: skip
    for path in ("gsrv socket", "gsrv splice"):
        cpu = _med(results, rate, path, "server CPU ms/session")
        lines.append(f"| server CPU per session, {path} (gsrv + spawner + guardian) | "
                     f"{'—' if cpu is None else f'{cpu:.3f} ms'} | ≤ 0.35 ms | "
                     f"{'—' if cpu is None else 'hit' if cpu <= 0.35 else 'missed'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--held", type=int, default=1000)
    parser.add_argument("--before", help="a checkout of the commit before issue 25 (the p99 beside a stream)")
    parser.add_argument("--out", default=os.path.join(servers.HERE, "results", "cheap_sessions.md"))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    text = report(args, run(args))
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
