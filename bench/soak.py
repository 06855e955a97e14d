"""Soak: the chaos mix (tests/chaos/mix.py) against one gsrv for minutes, then the same
audit as the chaos suite. Prints a summary table and writes it, with a plot of gsrv's RSS,
its active sessions and its throughput over time, to bench/results/.

    make soak                                     # 10 minutes
    .venv/bin/python bench/soak.py --minutes 2    # shorter
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "chaos")]

import audit  # noqa: E402
import mix  # noqa: E402
from conftest import Gsrv  # noqa: E402
from test_metrics import ADMIN, _admin, _samples  # noqa: E402

MiB = 1024 * 1024


def _sample(base: str) -> tuple[float, float]:
    """Active sessions and bytes relayed so far (both directions), from /metrics."""
    samples = _samples(base)
    active = sum(v for (name, _), v in samples.items() if name == "gsrv_sessions_active")
    moved = sum(v for (name, _), v in samples.items() if name == "gsrv_bytes_total")
    return active, moved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=24, help="clients at once")
    parser.add_argument("--out", default=str(HERE / "results"), help="where soak.md and soak.png go")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        mix.prepare(Path(tmp))
        config = Path(tmp) / "soak.toml"
        config.write_text('[server]\nkill_grace = "1s"\n' + ADMIN + mix.services_toml(max_sessions=64))
        server = Gsrv(config)
        try:
            return _soak(server, args.minutes * 60, args.workers, out)
        finally:
            server.stop()


def _soak(server: Gsrv, seconds: float, workers: int, out: Path) -> int:
    admin = _admin(server)
    base = audit.snapshot(server)
    series: list[tuple[float, float, float, float]] = []  # t, rss MiB, active, MB/s
    stop = threading.Event()
    started = time.monotonic()

    def sampler() -> None:
        last_moved, last_t = 0.0, started
        while not stop.wait(1.0):
            now = time.monotonic()
            active, moved = _sample(admin)
            series.append((now - started, server.rss() / MiB, active, (moved - last_moved) / (now - last_t) / 1e6))
            last_moved, last_t = moved, now

    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    outcomes = mix.run(server.address, seconds, workers=workers, seed=int(time.time()))
    audit.wait_quiet(server, len(outcomes), timeout=60)
    stop.set()
    watcher.join(5)
    took = time.monotonic() - started
    problems = ""
    try:
        reasons = audit.account(server, outcomes)
        end = audit.settle(server, base)
        audit.no_leftovers(server, audit.rss_bound(base))
    except AssertionError as e:
        problems = str(e)
        reasons, end = Counter(), audit.snapshot(server)
    samples = _samples(admin)
    moved = {d: sum(v for (n, labels), v in samples.items() if n == "gsrv_bytes_total" and ("direction", d) in labels)
             for d in ("in", "out")}  # fmt: skip
    by_kind = Counter(o.service for o in outcomes)
    exact = sum(1 for o in outcomes if o.ok)
    lines = [
        f"# Soak: {seconds / 60:g} minutes of the chaos mix, {workers} clients at once",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `bench/soak.py --minutes {seconds / 60:g}`.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| sessions started | {len(outcomes):,} |",
        f"| sessions/s | {len(outcomes) / took:,.1f} |",
        *(f"| ended `{reason}` | {count:,} |" for reason, count in sorted(reasons.items())),
        f"| clients whose bytes were exactly right | {exact:,} of {len(outcomes):,} |",
        f"| bytes client → child | {moved['in']:,.0f} |",
        f"| bytes child → client | {moved['out']:,.0f} |",
        f"| gsrv RSS: start / peak / end (MiB) | {base.rss / MiB:.1f} / "
        f"{max(s[1] for s in series):.1f} / {server.rss() / MiB:.1f} |",
        f"| greenlets: start / end | {base.greenlets} / {end.greenlets} |",
        f"| fds: start / end | {base.fds} / {end.fds} |",
        f"| children: start / end | {base.children} / {end.children} |",
        f"| audit | {'nothing left behind, every session accounted for' if not problems else 'FAILED'} |",
        "",
        "Sessions by kind: " + ", ".join(f"{k} {v:,}" for k, v in sorted(by_kind.items())),
    ]
    if problems:
        lines += ["", "```", problems[:4000], "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "soak.md").write_text(text)
    _plot(series, out / "soak.png", seconds)
    print(f"wrote {out / 'soak.md'} and {out / 'soak.png'}")
    return 1 if problems else 0


def _plot(series: list[tuple[float, float, float, float]], path: Path, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] / 60 for s in series]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    for ax, values, label in zip(
        axes,
        ([s[1] for s in series], [s[2] for s in series], [s[3] for s in series]),
        ("gsrv RSS (MiB)", "active sessions", "throughput (MB/s, both ways)"),
        strict=True,
    ):
        ax.plot(t, values, linewidth=0.8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(f"gsrv soak: the chaos mix for {seconds / 60:g} minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
