"""The hot-path cost of the admin endpoint: gsrv's own CPU seconds per GiB relayed (1 GiB
into `wc -c`), with [admin] (scraped every second) and without, interleaved. Prints Markdown."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import psutil

sys.path.insert(0, os.path.dirname(__file__))
import measures  # noqa: E402  (the sibling modules: clients and servers)
import servers  # noqa: E402

GiB = 1024**3


def one_run(admin: bool, tmp: str, size: int) -> float:
    extra = '[admin]\nlisten = "127.0.0.1:0"\n' if admin else ""
    proc = servers.gsrv(extra)(["wc", "-c"], tmp)
    admin_port = int(servers.admin_url(tmp).rsplit(":", 1)[1]) if admin else None
    addr = servers.wait_listening(proc.pid, ignore=admin_port)
    stop = threading.Event()
    scraper = None
    if admin:
        url = servers.admin_url(tmp)

        def scrape() -> None:
            while not stop.wait(1.0):
                with urllib.request.urlopen(url + "/metrics", timeout=5) as reply:
                    reply.read()

        scraper = threading.Thread(target=scrape)
        scraper.start()
    try:
        me = psutil.Process(proc.pid)
        before = me.cpu_times()
        measures.into_wc(addr, proc.pid, size)
        after = me.cpu_times()
    finally:
        stop.set()
        if scraper is not None:
            scraper.join(timeout=10)
        servers.stop(proc)
    cpu = (after.user - before.user) + (after.system - before.system)
    return cpu / (size / GiB)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    results: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="gsrv-admin-cost-") as tmp:
        for run in range(args.runs):
            for admin in (False, True):
                value = one_run(admin, tmp, size)
                results[admin].append(value)
                print(f"  run {run + 1} admin={admin}: {value:.3f} CPU s/GiB", file=sys.stderr, flush=True)
    without, with_admin = statistics.median(results[False]), statistics.median(results[True])
    print(f"\ngsrv CPU per GiB into wc -c, medians of {args.runs} interleaved runs, {time.strftime('%Y-%m-%d')}\n")
    print("| admin endpoint | CPU s per GiB | ratio |")
    print("|---|---:|---:|")
    print(f"| off | {without:.3f} | 1.00 |")
    print(f"| on, /metrics scraped every 1 s | {with_admin:.3f} | {with_admin / without:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
