"""gsrv "before" against "after": two checkouts, each with its own .venv, in interleaved rounds
(before, after, before, after, ...), one fresh gsrv per tree per round. Measures, each taken
with the client of the bench script named:

- sessions/s: N sessions of 10 bytes into `wc -c`, C at a time, every answer checked
  (measures.sessions_per_s);
- HTTP req/s, a connection per request: `ab -n N -c C` GET of a one-line CGI sh script
  (cgi_hosts.py's hello.sh, chunked answer; measures.httpd_ab, failures and non-2xx refused);
- HTTP req/s, keep-alive: `h2load --h1 -n N -c C` GET of cgi_hosts.py's sized.sh (it prints
  its own Content-Length), every request checked to succeed with a 2xx;
- WebSocket echo MB/s: M MiB through `cat` in binary messages of 64 KiB, sender and receiver
  at once, byte count checked (websocket.py's ws_echo);
- optionally (--ws-sessions N) WebSocket sessions/s: 10 bytes into `wc -c`, 20 at a time,
  close code 1000 checked (websocket.py's ws_short).

Every service: kill_scope = "group" (servers.GROUP, bench.py's baseline), the server's kill_grace
and drain_timeout 1 s, max_sessions 1100, backlog 2048. gsrv runs as TREE/.venv/bin/python -m
gsrv serve -c CONFIG with cwd = TREE and no PYTHONPATH, after a check that this python imports
the tree's own gsrv. Listen ports are 0 (the address comes from gsrv's log); traffic stays on
127.0.0.1; every measure is bounded in count and time; only the gsrv processes this script
started (and the processes below them) are ended, by PID.

Usage: python bench/compare_trees.py --before TREE --after TREE [--rounds 3] [--sessions 2000]
       [--requests 2000] [--concurrency 20] [--ws-mib 256] [--ws-sessions 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import cgi_hosts
import gevent
import measures
import servers
import websocket

MEASURE_TIMEOUT = 600.0  # seconds: a measure longer than this fails (and the run goes on)
SERVICE = servers.GROUP + "max_sessions = 1100\nbacklog = 2048\n"
SERVICES = ("tcp_wc", "http_hello", "http_sized", "ws_cat", "ws_wc")
LISTENING = re.compile(r"event=listening service=(\S+) address=([\d.]+):(\d+)")
Measure = Callable[[tuple[str, int], int], float]


def config(root: str) -> str:
    """gsrv's config: one service per measure, the CGI scripts from cgi_hosts.www(root)."""
    # hello.sh answers at /index.html: the path measures.httpd_ab asks for
    return (
        '[server]\nkill_grace = "1s"\ndrain_timeout = "1s"\n'
        f'[services.tcp_wc]\nlisten = "127.0.0.1:0"\ncommand = ["wc", "-c"]\n{SERVICE}'
        f'[services.http_hello]\nlisten = "127.0.0.1:0"\ncommand = ["{root}/hello.sh"]\n{SERVICE}'
        'transport = "http"\nhttp = { path = "/index.html" }\n'
        f'[services.http_sized]\nlisten = "127.0.0.1:0"\ncommand = ["{root}/sized.sh"]\n{SERVICE}'
        'transport = "http"\nhttp = { path = "/sized.sh" }\n'
        f'[services.ws_cat]\nlisten = "127.0.0.1:0"\ncommand = ["cat"]\n{SERVICE}'
        'transport = "websocket"\nwebsocket = { messages = "binary" }\n'
        f'[services.ws_wc]\nlisten = "127.0.0.1:0"\ncommand = ["wc", "-c"]\n{SERVICE}'
        'transport = "websocket"\nwebsocket = { messages = "binary" }\n'
    )


def clean_env() -> dict[str, str]:
    """This process's environment without what would point a python at another gsrv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def check_tree(tree: str) -> str:
    """The tree's python, once it is known to import the tree's own gsrv."""
    python = os.path.join(tree, ".venv", "bin", "python")
    if not os.access(python, os.X_OK):
        raise SystemExit(f"{python}: no such python (each tree needs its own .venv with gsrv installed)")
    out = subprocess.run(
        [python, "-c", "import gsrv; print(gsrv.__file__)"],
        cwd=tree,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    where = os.path.realpath(out.stdout.strip())
    if out.returncode != 0 or not where.startswith(os.path.realpath(tree) + os.sep):
        raise SystemExit(f"{python} (cwd {tree}) imports gsrv from {where or out.stderr[-300:]!r}, not {tree}")
    return python


def start(tree: str, python: str, tmp: str) -> tuple[subprocess.Popen[bytes], dict[str, tuple[str, int]]]:
    """The tree's gsrv and {service: (host, port)} once every service listens.

    Not serving.serve: it runs sys.executable in this process's cwd and environment (with
    another cwd or a PYTHONPATH, `-m gsrv` imports whatever gsrv sits there), and leaves a
    gsrv that did not start in time running."""
    path = os.path.join(tmp, "gsrv.toml")
    with open(path, "w") as f:
        f.write(config(cgi_hosts.www(tmp)))
    with open(os.path.join(tmp, "gsrv.log"), "w+") as log:
        proc = subprocess.Popen(
            [python, "-m", "gsrv", "serve", "-c", path],
            cwd=tree,
            env=clean_env(),
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        found: dict[str, tuple[str, int]] = {}
        deadline = time.monotonic() + 20
        while len(found) < len(SERVICES):
            if time.monotonic() > deadline or proc.poll() is not None:
                servers.stop(proc)
                log.seek(0)
                raise SystemExit(f"gsrv of {tree} did not start; its log:\n{log.read()[-2000:]}")
            time.sleep(0.05)
            log.seek(0)
            for name, host, port in LISTENING.findall(log.read()):
                found[name] = (host, int(port))
    return proc, found


def sessions_per_s(addr: tuple[str, int], pid: int, count: int, concurrency: int) -> float:
    """measures.sessions_per_s, bounded in time."""
    with gevent.Timeout(MEASURE_TIMEOUT):
        return measures.sessions_per_s(addr, pid, count, concurrency)["sessions/s"]


def ab(addr: tuple[str, int], pid: int, count: int, concurrency: int) -> float:
    """measures.httpd_ab's requests/s, refused when a request failed or was not a 2xx."""
    result = measures.httpd_ab(addr, pid, count, concurrency)
    if result["lost"]:
        raise RuntimeError(f"ab: {result['lost']:.0f} of {count} requests failed or not 2xx")
    return result["req/s"]


def h2load(addr: tuple[str, int], path: str, count: int, concurrency: int) -> float:
    """Requests/s of `h2load --h1`, refused unless every request succeeded with a 2xx.

    Not cgi_hosts.h2load: it fixes -c 20, sets no per-request timeout and counts failures
    without refusing them or checking the status codes."""
    run = subprocess.run(
        ["h2load", "--h1", "-n", str(count), "-c", str(concurrency), "-N", "30", f"http://{addr[0]}:{addr[1]}{path}"],
        capture_output=True,
        text=True,
        timeout=MEASURE_TIMEOUT,
    )
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", run.stdout)
    ok = re.search(r"(\d+) succeeded", run.stdout)
    codes = re.search(r"status codes: (\d+) 2xx", run.stdout)
    if not (rate and ok and codes):
        raise RuntimeError(f"h2load failed ({run.returncode}): {run.stdout[-300:]} {run.stderr[-300:]}")
    if int(ok.group(1)) != count or int(codes.group(1)) != count:
        raise RuntimeError(f"h2load: {ok.group(1)} succeeded, {codes.group(1)} 2xx of {count}")
    return float(rate.group(1))


def ws_mb_s(addr: tuple[str, int], mib: int) -> float:
    """MB/s of websocket.ws_echo: `mib` MiB through the service and back, bounded in time."""
    block = os.urandom(64 * 1024)
    total = mib * measures.MiB
    t0 = time.perf_counter()
    asyncio.run(asyncio.wait_for(websocket.ws_echo(addr[1], total, block), MEASURE_TIMEOUT))
    return total / 1e6 / (time.perf_counter() - t0)


def ws_sessions_s(addr: tuple[str, int], count: int) -> float:
    """Sessions/s of websocket.ws_short, 20 at a time (websocket.many), bounded in time."""
    t0 = time.perf_counter()
    asyncio.run(asyncio.wait_for(websocket.many(websocket.ws_short, addr[1], count), MEASURE_TIMEOUT))
    return count / (time.perf_counter() - t0)


def plan(args: argparse.Namespace) -> list[tuple[str, str, Measure]]:
    """(title, service, measure) of each row."""
    n, r, c = args.sessions, args.requests, args.concurrency
    rows: list[tuple[str, str, Measure]] = [
        (f"sessions/s ({n} × 10 B into wc -c, {c} at a time)", "tcp_wc", lambda a, p: sessions_per_s(a, p, n, c)),
        (f"HTTP req/s, a connection each (ab -n {r} -c {c}, CGI sh)", "http_hello", lambda a, p: ab(a, p, r, c)),
        (
            f"HTTP req/s, keep-alive (h2load --h1 -n {r} -c {c}, CGI sh)",
            "http_sized",
            lambda a, p: h2load(a, "/sized.sh", r, c),
        ),
        (
            f"WebSocket echo MB/s ({args.ws_mib} MiB through cat, 64 KiB binary messages)",
            "ws_cat",
            lambda a, p: ws_mb_s(a, args.ws_mib),
        ),
    ]
    if args.ws_sessions:
        rows.append(
            (
                f"WebSocket sessions/s ({args.ws_sessions} × 10 B into wc -c, 20 at a time)",
                "ws_wc",
                lambda a, p: ws_sessions_s(a, args.ws_sessions),
            )
        )
    return rows


def warm_up(ports: dict[str, tuple[str, int]], pid: int) -> None:
    """A few unmeasured sessions on each path: the first spawns and imports are not measured."""
    sessions_per_s(ports["tcp_wc"], pid, 20, 5)
    ab(ports["http_hello"], pid, 20, 5)
    h2load(ports["http_sized"], "/sized.sh", 20, 5)
    ws_mb_s(ports["ws_cat"], 1)


Results = dict[str, dict[str, list[float]]]
Errors = dict[str, dict[str, list[str]]]


def run(args: argparse.Namespace) -> tuple[Results, Errors]:
    """Each measure's values and failures, per side, over the interleaved rounds."""
    trees = {"before": args.before, "after": args.after}
    pythons = {side: check_tree(tree) for side, tree in trees.items()}
    rows = plan(args)
    results: Results = {title: {"before": [], "after": []} for title, _, _ in rows}
    errors: Errors = {title: {"before": [], "after": []} for title, _, _ in rows}
    with tempfile.TemporaryDirectory(prefix="gsrv-compare-") as top:
        os.chmod(top, 0o755)  # the CGI scripts below it are run by gsrv's children
        for round_ in range(args.rounds):
            for side in ("before", "after"):
                tmp = os.path.join(top, f"{round_}-{side}")
                os.makedirs(tmp)
                proc, ports = start(trees[side], pythons[side], tmp)
                try:
                    warm_up(ports, proc.pid)
                    for title, service, measure in rows:
                        try:
                            value = measure(ports[service], proc.pid)
                            results[title][side].append(value)
                            print(f"round {round_ + 1} {side}: {title}: {value:,.1f}", file=sys.stderr, flush=True)
                        except (Exception, gevent.Timeout) as e:  # a failed measure is a cell that says so
                            errors[title][side].append(f"{type(e).__name__}: {e}"[:200])
                            print(f"round {round_ + 1} {side}: {title}: FAILED {e}", file=sys.stderr, flush=True)
                finally:
                    servers.stop(proc)
                if proc.returncode not in (0, -15):
                    print(f"round {round_ + 1} {side}: gsrv exited {proc.returncode}", file=sys.stderr)
    return results, errors


def describe(tree: str) -> str:
    """The tree's commit, with "+ changes" when its work tree differs from it."""
    head = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain"], capture_output=True, text=True)
    return (head.stdout.strip() or "?") + (" + changes" if dirty.stdout.strip() else "")


def machine(loads: tuple[float, float, float], ends: tuple[float, float, float]) -> str:
    """The machine line: cores this process may use, load average at start and end."""
    shown = [" ".join(f"{v:.2f}" for v in load) for load in (loads, ends)]
    return f"machine: nproc {len(os.sched_getaffinity(0))}, load average {shown[0]} at start, {shown[1]} at end"


def cell(values: list[float], digits: int) -> str:
    """median (min–max), or a dash when no round gave a value."""
    if not values:
        return "—"
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def report(args: argparse.Namespace, results: Results, errors: Errors, machine_line: str, date: str) -> str:
    """The markdown report: heading, machine, trees, the table, then each failure."""
    lines = [
        f"# gsrv before / after (bench/compare_trees.py), {args.rounds} interleaved round(s), {date}",
        "",
        machine_line,
        "",
        f"before: {args.before} ({describe(args.before)}); after: {args.after} ({describe(args.after)})",
        "",
        "| measure | before median (min–max) | after median (min–max) | after/before |",
        "|---|---|---|---|",
    ]
    for title, sides in results.items():
        b, a = sides["before"], sides["after"]
        digits = 1 if "MB/s" in title else 0
        ratio = f"{statistics.median(a) / statistics.median(b):.2f}" if a and b else "—"
        lines.append(f"| {title} | {cell(b, digits)} | {cell(a, digits)} | {ratio} |")
    failures = [
        f"FAILED {side}: {title}: {e}" for title, sides in errors.items() for side, es in sides.items() for e in es
    ]
    if failures:
        lines += ["", *failures]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a checkout with its own .venv (gsrv installed from it)")
    parser.add_argument("--after", required=True, help="the same, for the new code")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--ws-mib", type=int, default=256)
    parser.add_argument("--ws-sessions", type=int, default=0, help="0: no WebSocket sessions/s row")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    date, loads = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()
    results, errors = run(args)
    text = report(args, results, errors, machine(loads, os.getloadavg()), date)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
