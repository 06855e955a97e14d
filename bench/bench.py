"""gsrv beside its peers in ONE interleaved run: socat (-b 8192 and -b 65536), tcpserver,
a naive and a producer/consumer Twisted relay. Writes bench/results/latest.md and two plots.

Usage: python bench/bench.py [--runs 3] [--smoke] ; `make bench` runs it. Every server
listens on 127.0.0.1 on a port it picks; every loop is bounded; only processes this
script started are ended, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import measures
import servers

HERE = os.path.dirname(os.path.abspath(__file__))
# Script files, not "sh -c" strings: socat's EXEC splits its command at spaces.
# sys.executable, not "python3": a pyenv shim's helper processes would count as the server's.
SLOW_READER = [sys.executable, os.path.join(HERE, "peers", "slow_reader.py")]
HALF_CLOSE = [os.path.join(HERE, "peers", "late_answer.sh")]
HTTPD = ["busybox", "httpd", "-i", "-h", os.path.join(HERE, "peers", "www")]  # inetd mode: one request per session
NEEDS = {"busybox": ("busybox", "ab")}  # a measure whose tools are missing is left out
TWISTED = {"Twisted naive", "Twisted P/C"}  # their relays do not half-close: ab would wait for each reply
RSS_CAP = 2 * 1024**3  # the slow-child run stops a server that passes this (unbounded)


def install_peers() -> None:
    """socat and tcpserver from Debian when missing and we may (root); else they are skipped."""
    tools = (("socat", "socat"), ("tcpserver", "ucspi-tcp"), ("busybox", "busybox"), ("ab", "apache2-utils"))
    missing = [pkg for tool, pkg in tools if not shutil.which(tool)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} with apt-get", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, capture_output=True, timeout=600)


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], Callable[..., dict[str, Any]], set[str]]]:
    size = args.size_mib * 1024 * 1024
    return [
        (f"client→child, {args.size_mib} MiB into wc -c", ["wc", "-c"],
         lambda a, p: measures.into_wc(a, p, size), set()),
        (f"echo through cat, {args.size_mib} MiB", ["cat"], lambda a, p: measures.echo(a, p, size), set()),
        (f"slow child (~6 MB/s), client pushing {args.slow_seconds:g} s: server RSS growth", SLOW_READER,
         lambda a, p: measures.slow_child(a, p, args.slow_seconds, RSS_CAP), set()),
        (f"{args.stalled} stalled sessions (sleep): memory per session", ["sleep", "120"],
         lambda a, p: measures.stalled(a, p, args.stalled, 8 * 1024 * 1024), {"Twisted naive"}),
        (f"sessions/s, {args.sessions} × 10 B into wc -c, 20 at a time", ["wc", "-c"],
         lambda a, p: measures.sessions_per_s(a, p, args.sessions), set()),
        ("half-close: answer 1 s after EOF", HALF_CLOSE, lambda a, p: measures.half_close(a, p), set()),
        (f"sessions/s as above, beside {args.held} held sessions", ["wc", "-c"],
         lambda a, p: measures.sessions_beside_held(a, p, args.sessions, args.held), set()),
        (f"{args.latency_count} × 10 B through cat, one at a time: latency", ["cat"],
         lambda a, p: measures.latency(a, p, args.latency_count, beside_stream=False), set()),
        ("the same beside a client streaming flat out through cat", ["cat"],
         lambda a, p: measures.latency(a, p, args.latency_count, beside_stream=True), set()),
        (f"busybox httpd -i under ApacheBench, {args.sessions} GETs, 20 at a time", HTTPD,
         lambda a, p: measures.httpd_ab(a, p, args.sessions), TWISTED),
    ]  # fmt: skip


def run(args: argparse.Namespace) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], list[servers.Peer]]:
    peers = [p for p in servers.PEERS if not args.peers or p.name in args.peers]
    usable = []
    for peer in peers:
        if peer.available():
            usable.append(peer)
        else:
            print(f"skipping {peer.name}: {peer.needs} is not installed", file=sys.stderr)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="gsrv-bench-") as tmp:
        for title, command, measure, skip in plan(args):
            for n in range(args.runs):
                for peer in usable:  # interleaved: each peer once per round
                    if peer.name in skip or not all(shutil.which(tool) for tool in NEEDS.get(command[0], ())):
                        continue
                    proc = peer.start(command, tmp)
                    try:
                        address = servers.wait_listening(proc.pid)
                        servers.COMMAND[:] = command
                        value = measure(address, proc.pid)
                    except Exception as e:  # a peer that fails a measure is reported, not fatal
                        value = {"error": f"{type(e).__name__}: {e}"}
                    finally:
                        servers.stop(proc)
                    results.setdefault((title, peer.name), []).append(value)
                    shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in value.items() if k != "series"}
                    print(f"  {title} | {peer.name} run {n + 1}: {shown}", file=sys.stderr, flush=True)
    return results, usable


def _figures(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in runs if key in r and isinstance(r[key], (int, float))]


def _cell(values: list[float], key: str) -> str:
    if not values:
        return "—"
    if key == "delivered":
        return "delivered" if min(values) == 1 else ("lost" if max(values) == 0 else "sometimes lost")
    med = statistics.median(values)
    return f"{med:,.1f}" if len(values) == 1 else f"{med:,.1f} ({min(values):,.1f}–{max(values):,.1f})"


BETTER_LOW = {"CPU s/GiB", "peak MiB", "server KB", "machine KB"}


def report(
    args: argparse.Namespace, results: dict[tuple[str, str], list[dict[str, Any]]], peers: list[servers.Peer]
) -> str:
    names = [p.name for p in peers]
    lines = [
        "# gsrv beside its peers",
        "",
        f"{os.cpu_count()} CPUs ({_cpu()}), Linux {os.uname().release}, Python {sys.version.split()[0]}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Client, servers and children share the cores. "
        f"Medians of {args.runs} interleaved runs (min–max); ratios are gsrv / peer "
        "(above 1 is better for gsrv on rates, below 1 on costs).",
        "",
        "| measure | figure | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    ratio_rows = []
    for title, _command, _measure, _skip in plan(args):
        keys = sorted(
            {k for n in names for r in results.get((title, n), []) for k in r if k not in ("series", "capped", "error")}
        )
        for key in keys:
            cells = [_cell(_figures(results.get((title, n), []), key), key) for n in names]
            lines.append(f"| {title} | {key} | " + " | ".join(cells) + " |")
            ours = _figures(results.get((title, "gsrv"), []), key)
            if ours and key != "delivered":
                ratios = []
                for n in names[1:]:
                    theirs = _figures(results.get((title, n), []), key)
                    # a peer at ~0 (tcpserver touches no byte) has no meaningful ratio
                    small = not theirs or abs(statistics.median(theirs)) < max(0.05, abs(statistics.median(ours)) / 50)
                    ratios.append("—" if small else f"{statistics.median(ours) / statistics.median(theirs):.2f}")
                ratio_rows.append(f"| {title} | {key} | " + " | ".join(ratios) + " |")
        for n in names:
            errors = [r["error"] for r in results.get((title, n), []) if "error" in r]
            capped = [r for r in results.get((title, n), []) if r.get("capped")]
            if errors:
                lines.append(f"| {title} | failed | {n}: {errors[0]} |" + " |" * (len(names) - 1))
            if capped:
                lines.append(
                    f"| {title} | stopped | {n} passed {RSS_CAP // 2**30} GiB of RSS: unbounded |"
                    + " |" * (len(names) - 1)
                )
    if len(names) > 1:
        lines += ["", "gsrv / peer:", "", "| measure | figure | " + " | ".join(names[1:]) + " |",
                  "|---|---|" + "---:|" * (len(names) - 1), *ratio_rows]  # fmt: skip
    lines += targets(args, results)
    lines += ["", "Commands:", ""] + [f"- {p.name}: `{p.how}`" for p in peers]
    lines += ["", "![server RSS while a client pushes at a slow child](rss_slow_child.png)",
              "", "![gsrv / peer](ratios.png)", ""]  # fmt: skip
    return "\n".join(lines)


def targets(args: argparse.Namespace, results: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Issue 7's targets, each as measured in this run (medians)."""
    titles = [t for t, *_ in plan(args)]

    def med(measure: int, peer: str, key: str) -> float | None:
        values = _figures(results.get((titles[measure], peer), []), key)
        return statistics.median(values) if values else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    s64, tcp = "socat -b 65536", "tcpserver"
    rows: list[tuple[str, float | None, str, Callable[[float], bool] | None]] = [
        ("client→child ≥ 2.0× socat -b 65536", ratio(med(0, "gsrv", "MB/s"), med(0, s64, "MB/s")), "×",
         lambda r: r >= 2.0),
        ("client→child ≥ 0.8× tcpserver", ratio(med(0, "gsrv", "MB/s"), med(0, tcp, "MB/s")), "×", lambda r: r >= 0.8),
        ("echo ≥ 1.2× socat -b 65536", ratio(med(1, "gsrv", "MB/s"), med(1, s64, "MB/s")), "×", lambda r: r >= 1.2),
        ("sessions/s ≥ 1.2× socat -b 65536", ratio(med(4, "gsrv", "sessions/s"), med(4, s64, "sessions/s")), "×",
         lambda r: r >= 1.2),
        ("sessions/s ≥ 0.7× tcpserver", ratio(med(4, "gsrv", "sessions/s"), med(4, tcp, "sessions/s")), "×",
         lambda r: r >= 0.7),
        (f"sessions/s beside {args.held} held ≥ 0.8× without",
         ratio(med(6, "gsrv", "sessions/s"), med(4, "gsrv", "sessions/s")), "×", lambda r: r >= 0.8),
        ("server memory per stalled session ≤ 64 KB", med(3, "gsrv", "server KB"), "KB", lambda r: r <= 64),
        ("machine memory per stalled session ≤ socat -b 65536's",
         ratio(med(3, "gsrv", "machine KB"), med(3, s64, "machine KB")), "×", lambda r: r <= 1.0),
        ("server CPU per GiB into wc -c, splice / copy",
         ratio(med(0, "gsrv", "CPU s/GiB"), med(0, "gsrv copy", "CPU s/GiB")), "×", None),
        ("server CPU per GiB echo, splice / copy",
         ratio(med(1, "gsrv", "CPU s/GiB"), med(1, "gsrv copy", "CPU s/GiB")), "×", None),
        ("10-byte p99 beside a stream ≤ 3× alone", ratio(med(8, "gsrv", "p99 ms"), med(7, "gsrv", "p99 ms")), "×",
         lambda r: r <= 3.0),
    ]  # fmt: skip
    lines = ["", "Issue 7's targets (gsrv with relay = \"auto\", medians of this run):", "",
             "| target | measured | met |", "|---|---:|---|"]  # fmt: skip
    lines += [_target_row(*row) for row in rows]
    return lines + handoff_targets(args, results) + containment_rows(args, results)


def _target_row(name: str, value: float | None, unit: str, check: Callable[[float], bool] | None,
                spread: str = "") -> str:  # fmt: skip
    shown = "—" if value is None else f"{value:,.2f} {unit}{spread}"
    verdict = "reported" if check is None else "—" if value is None else ("yes" if check(value) else "no")
    return f"| {name} | {shown} | {verdict} |"


def paired(results: dict[tuple[str, str], list[dict[str, Any]]], title: str, ours: tuple[str, str],
           theirs: tuple[str, str], key: str) -> list[float]:  # fmt: skip
    """Ratios within each interleaved round (run n of one against run n of the other): the
    machine's drift between rounds cancels. ours/theirs: (measure title, peer)."""
    a, b = results.get(ours, []), results.get(theirs, [])
    return [x[key] / y[key] for x, y in zip(a, b, strict=False) if x.get(key) and y.get(key)]


def handoff_targets(args: argparse.Namespace, results: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Issue 15's targets: per-round ratios, their median (min–max over the rounds)."""
    titles = [t for t, *_ in plan(args)]
    tcp, sock = "tcpserver", "gsrv socket"

    def row(name: str, ours: tuple[int, str], theirs: tuple[int, str], key: str,
            check: Callable[[float], bool] | None) -> str:  # fmt: skip
        ratios = paired(results, titles[ours[0]], (titles[ours[0]], ours[1]), (titles[theirs[0]], theirs[1]), key)
        if not ratios:
            return _target_row(name, None, "×", check)
        spread = f" ({min(ratios):.2f}–{max(ratios):.2f}, {len(ratios)} rounds)"
        return _target_row(name, statistics.median(ratios), "×", check, spread)

    def worst(measure: int, peer: str, key: str) -> float | None:
        values = _figures(results.get((titles[measure], peer), []), key)
        return max(values) if values else None

    stalled = _figures(results.get((titles[3], sock), []), "server KB")
    lines = ["", "Issue 15's targets (ratios paired within each interleaved round; median, min–max):", "",
             "| target | measured | met |", "|---|---:|---|",
             row("client→child, socket ≥ 0.95× tcpserver", (0, sock), (0, tcp), "MB/s", lambda r: r >= 0.95),
             row("echo through cat, socket ≥ 0.95× tcpserver", (1, sock), (1, tcp), "MB/s", lambda r: r >= 0.95),
             row("sessions/s, socket ≥ 1.0× tcpserver", (4, sock), (4, tcp), "sessions/s", lambda r: r >= 1.0),
             row("sessions/s, splice ≥ 0.8× tcpserver", (4, "gsrv"), (4, tcp), "sessions/s", lambda r: r >= 0.8),
             row(f"sessions/s beside {args.held} held ≥ 0.8× without, splice", (6, "gsrv"), (4, "gsrv"),
                 "sessions/s", lambda r: r >= 0.8),
             row(f"sessions/s beside {args.held} held ≥ 0.8× without, socket", (6, sock), (4, sock), "sessions/s",
                 lambda r: r >= 0.8),
             row("httpd -i req/s, socket ≥ 1.0× tcpserver", (9, sock), (9, tcp), "req/s", lambda r: r >= 1.0),
             row("httpd -i req/s, splice ≥ 0.8× tcpserver", (9, "gsrv"), (9, tcp), "req/s", lambda r: r >= 0.8),
             _target_row("httpd -i requests lost, every gsrv path and round: 0",
                         max((v for p in ("gsrv", "gsrv copy", sock) if (v := worst(9, p, "lost")) is not None),
                             default=None), "", lambda r: r == 0),
             _target_row("server memory per stalled session, socket ≤ 16 KB",
                         statistics.median(stalled) if stalled else None, "KB", lambda r: r <= 16)]  # fmt: skip
    return lines


def containment_rows(args: argparse.Namespace, results: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Issue 16: what a cgroup per session costs, against the same path with kill_scope = "group"
    (per-round ratios, median, min–max). No target: the figures for the note."""
    titles = [t for t, *_ in plan(args)]
    if not any(peer == "gsrv cgroup" for _, peer in results):
        return []

    def row(name: str, measure: int, ours: str, theirs: str, key: str) -> str:
        ratios = paired(results, titles[measure], (titles[measure], ours), (titles[measure], theirs), key)
        if not ratios:
            return f"| {name} | — |"
        return f"| {name} | {statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |"

    return ["", "Containment (kill_scope = \"cgroup\" against \"group\", paired per round):", "",
            "| figure | cgroup / group |", "|---|---:|",
            row("sessions/s, splice", 4, "gsrv cgroup", "gsrv", "sessions/s"),
            row("sessions/s, socket", 4, "gsrv socket cgroup", "gsrv socket", "sessions/s"),
            row(f"sessions/s beside {args.held} held, splice", 6, "gsrv cgroup", "gsrv", "sessions/s"),
            row("httpd -i req/s, splice", 9, "gsrv cgroup", "gsrv", "req/s"),
            row("httpd -i req/s, socket", 9, "gsrv socket cgroup", "gsrv socket", "req/s"),
            row("client→child MB/s, splice", 0, "gsrv cgroup", "gsrv", "MB/s")]  # fmt: skip


def plots(
    args: argparse.Namespace, results: dict[tuple[str, str], list[dict[str, Any]]], peers: list[servers.Peer], out: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = [t for t, *_ in plan(args)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p in peers:
        runs = [r for r in results.get((titles[2], p.name), []) if "series" in r]
        if runs:
            xs, ys = zip(*runs[0]["series"], strict=True)
            ax.plot(xs, ys, label=p.name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS growth, MiB")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_title("A client pushes as fast as it can at a child reading ~6 MB/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rss_slow_child.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    others = [p.name for p in peers if p.name != "gsrv"]
    bars = [(titles[0], "MB/s", "client→child"), (titles[1], "MB/s", "echo"), (titles[4], "sessions/s", "sessions/s")]
    width = 0.8 / max(1, len(bars))
    for i, (title, key, label) in enumerate(bars):
        ours = _figures(results.get((title, "gsrv"), []), key)
        values = []
        for n in others:
            theirs = _figures(results.get((title, n), []), key)
            values.append(statistics.median(ours) / statistics.median(theirs) if ours and theirs else 0)
        ax.bar([x + i * width for x in range(len(others))], values, width, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([x + width for x in range(len(others))], others)
    ax.set_ylabel("gsrv / peer (above 1: gsrv ahead)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ratios.png"), dpi=100)
    plt.close(fig)


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1] for line in f if line.startswith("model name")]
    return re.sub(r"\s+", " ", names[0]).strip() if names else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--stalled", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--slow-seconds", type=float, default=10)
    parser.add_argument("--held", type=int, default=1000, help="sessions held open beside the sessions/s run")
    parser.add_argument("--latency-count", type=int, default=300, help="10-byte sessions per latency measure")
    parser.add_argument("--peers", nargs="*", help="only these (names as in the table)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--report-only", action="store_true", help="write the report again from latest.json")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, one run, gsrv only (CI: keeps it from rotting)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.size_mib, args.stalled, args.sessions, args.slow_seconds = 1, 8, 20, 40, 1.5
        args.held, args.latency_count = 20, 20
        args.peers = args.peers or ["gsrv"]
    else:
        install_peers()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    os.makedirs(args.out, exist_ok=True)
    raw = os.path.join(args.out, "latest.json")
    if args.report_only:
        with open(raw) as f:
            saved = json.load(f)
        results = {(k["measure"], k["peer"]): k["runs"] for k in saved["results"]}
        peers = [p for p in servers.PEERS if p.name in saved["peers"]]
        args.runs = saved["runs"]
    else:
        results, peers = run(args)
        with open(raw, "w") as f:
            rows = [{"measure": t, "peer": n, "runs": r} for (t, n), r in results.items()]
            json.dump({"runs": args.runs, "peers": [p.name for p in peers], "results": rows}, f)
    text = report(args, results, peers)
    with open(os.path.join(args.out, "latest.md"), "w") as f:
        f.write(text)
    try:
        plots(args, results, peers, args.out)
    except ImportError:
        print("no plots: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
    print(text)
    failed = [k for k, runs in results.items() if k[1] == "gsrv" and any("error" in r for r in runs)]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
