"""The cost of one memory-guard sample (own RSS, virtual_memory, the cgroup's files), as the
guard takes it every interval in the server's loop. Prints a Markdown table."""

from __future__ import annotations

import statistics
import sys
import time

from gsrv.accept.guard import Sampler


def main() -> int:
    sampler = Sampler()
    for _ in range(50):  # warm up: psutil caches, page cache of the /proc and cgroup files
        sampler.sample()
    times = []
    for _ in range(2000):
        t0 = time.perf_counter()
        sampler.sample()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    cgroup = f"cgroup v{sampler.cgroup.version}, {len(sampler.cgroup.dirs)} levels" if sampler.cgroup else "no cgroup"
    print(f"\nmemory guard sample ({cgroup}), 2,000 samples, Python {sys.version.split()[0]}\n")
    print("| measure | median µs | p99 µs | max µs |")
    print("|---|---:|---:|---:|")
    print(f"| one sample | {statistics.median(times):.1f} | {times[int(len(times) * 0.99)]:.1f} | {times[-1]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
