"""What a spawn costs now that the spawner (gsrv/spawn) starts every child.

Part 1, gsrv's side, through the real Launcher and Spawner: how long gsrv's loop is blocked
per spawn (the request's send), the answer's latency (request sent -> the spawner answers,
which it does once posix_spawn returned, i.e. after the child's exec: an upper bound on
"the request reaching the spawner -> the child's exec"), and the time to the exit report;
one spawn at a time, then 20 at once (full rate), then one per 100 ms; plain, with the
prlimit/setpriv prefixes, in a session cgroup (v1: the kill's alone, and with accounting;
v2 on the unified hierarchy if there is one), in bwrap; and beside 1,000 live children.

Part 2, the spawn call itself in a plain process: os.posix_spawn against the stdlib's vfork
path (subprocess.Popen), with few and with 4,000 open fds: wall and CPU per spawn.

Each child is `true`. Prints Markdown tables of medians and p99s in milliseconds.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import gevent

from gsrv.config.contain import Containment, Sandbox
from gsrv.config.launch import Launch
from gsrv.contain.host import discover
from gsrv.contain.root import Root
from gsrv.contain.scope import Limits
from gsrv.logs import Log
from gsrv.relay.child import Child, Launcher
from gsrv.relay.stdio import Stdio
from gsrv.spawn.client import Spawner

COUNT = 300
TRUE = shutil.which("true") or "/bin/true"
SLEEP = shutil.which("sleep") or "/bin/sleep"
ENV = {"PATH": os.defpath}


def _ms(values: list[float]) -> str:
    values = sorted(values)
    return f"{statistics.median(values) * 1000:.2f} / {values[int(len(values) * 0.99)] * 1000:.2f}"


class Case:
    def __init__(self, name: str, launcher: Launcher, prefix: tuple[str, ...] = (), contain: Containment | None = None):
        self.name, self.launcher, self.contain = name, launcher, contain
        argv = (*prefix, TRUE)
        self.launch = Launch(argv, argv[0], ("bench",) if prefix else (), -1, 1, contain=contain)

    def start(self, command: Launch | None = None) -> tuple[Child, float, float]:
        """A child asked for: it, when it was asked, how long the ask blocked."""
        t0 = time.perf_counter()
        child = self.launcher.spawn(command or self.launch, ENV, Stdio.pipes("discard"))
        return child, t0, time.perf_counter() - t0

    def one(self) -> tuple[float, float, float]:
        child, t0, blocked = self.start()
        child.started()
        answered = time.perf_counter() - t0
        child.exited.wait(5)
        exited = time.perf_counter() - t0
        child.stop(1.0, lambda _: None)
        return blocked, answered, exited

    def burst(self, n: int = 20) -> list[float]:
        """n asked at once (full rate): each one's answer latency."""
        asked = [self.start() for _ in range(n)]
        latencies = []
        for child, t0, _ in asked:
            child.started()
            latencies.append(time.perf_counter() - t0)
        for child, _, _ in asked:
            child.exited.wait(5)
            child.stop(1.0, lambda _: None)
        return latencies

    def spaced(self, n: int = 20, every: float = 0.1) -> list[float]:
        latencies = []
        for _ in range(n):
            gevent.sleep(every)
            child, t0, _ = self.start()
            child.started()
            latencies.append(time.perf_counter() - t0)
            child.exited.wait(5)
            child.stop(1.0, lambda _: None)
        return latencies


def _cases(spawner: Spawner, roots: list[Root]) -> list[Case]:
    plain = Launcher(spawner)
    prlimit = (shutil.which("prlimit") or "/usr/bin/prlimit", "--nofile=1024:1024", "--")
    setpriv = (shutil.which("setpriv") or "/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--init-groups", "--")
    cases = [Case("plain", plain), Case("rlimits: prlimit prefix", plain, prlimit)]
    if os.geteuid() == 0:
        cases.append(Case("user: setpriv prefix", plain, setpriv))
        for root in roots:
            launcher = Launcher(spawner, root)
            mode = root.host.mode
            cases.append(Case(f"a session cgroup ({mode}, the kill's alone)", launcher,
                              contain=Containment(scope="cgroup")))  # fmt: skip
            cases.append(Case(f"a session cgroup ({mode}, accounting)", launcher,
                              contain=Containment(scope="cgroup", accounting=True, limits=Limits())))  # fmt: skip
    bwrap = shutil.which("bwrap")
    if bwrap:
        cases.append(Case("bwrap (private_tmp)", plain, (bwrap, *Sandbox(private_tmp=True).options(False), "--")))
    return cases


def _part1() -> None:
    roots = []
    if os.geteuid() == 0:
        for host in (discover(), discover("/sys/fs/cgroup/unified")):
            if host.mode != "none" and all(r.host.mode != host.mode for r in roots):
                root = Root(host)
                root.create()
                roots.append(root)
    spawner = Spawner(Log(2, "warning"))  # one spawner, homes of the first root (as gsrv: one host at a time)
    spawner.homes = roots[0].spawner_homes if roots else ()
    spawner.start()
    v2: Spawner | None = None
    try:
        print(f"\n### gsrv's side: {COUNT} spawns of `true` one at a time; ms median / p99\n")
        print("| spawn | loop blocked | answered | exit reported | 20 at once: answered | 1 per 100 ms: answered |")
        print("|---|---:|---:|---:|---:|---:|")
        for case in _cases(spawner, roots):
            root = case.launcher.root
            if case.contain is not None and root is not None and root.host.mode == "v2":
                if v2 is None:  # the v2 cases: a spawner whose home is the v2 root's leaf
                    v2 = Spawner(Log(2, "warning"), root.spawner_homes)
                    v2.start()
                case.launcher.spawner = v2
            case.one()  # warm: the pool's first cgroups
            rows = [case.one() for _ in range(COUNT)]
            burst = [v for _ in range(5) for v in case.burst()]
            spaced = case.spaced()
            cells = [_ms([r[i] for r in rows]) for i in range(3)] + [_ms(burst), _ms(spaced)]
            print(f"| {case.name} | {' | '.join(cells)} |")
        plain = Case("plain", Launcher(spawner))
        held: list[Child] = []
        for _ in range(50):  # 20 at a time: the spawner's socket holds a few dozen requests
            batch = [plain.start(Launch((SLEEP, "600"), SLEEP, (), -1, 2))[0] for _ in range(20)]
            for child in batch:
                child.started()
            held += batch
        rows = [plain.one() for _ in range(COUNT)]
        cells = [_ms([r[i] for r in rows]) for i in range(3)]
        print(f"| plain, beside 1,000 live children | {' | '.join(cells)} | | |")
        for child in held:
            os.kill(child.pid, signal.SIGKILL)
        for child in held:
            child.stop(1.0, lambda _: None)
    finally:
        spawner.close()
        if v2 is not None:
            v2.close()
        for root in roots:
            root.remove()


def _part2() -> None:
    print(f"\n### The spawn call in a plain process: {COUNT} spawns of `true`; ms per spawn, median\n")
    print("| spawn | wall, few fds | CPU, few fds | wall, 4,000 fds | CPU, 4,000 fds |")
    print("|---|---:|---:|---:|---:|")

    def posix_spawn() -> Callable[[], object]:
        pid = os.posix_spawn(TRUE, [TRUE], ENV, setsid=True, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        return lambda: os.waitpid(pid, 0)

    def popen() -> Callable[[], object]:
        return subprocess.Popen([TRUE], env=ENV, close_fds=True, start_new_session=True).wait

    rows: dict[str, list[str]] = {"os.posix_spawn": [], "subprocess.Popen (vfork, close_fds)": []}
    held: list[int] = []
    for fds in (0, 4000):
        while len(held) < fds:
            held.extend(os.pipe())
        for name, spawn in (("os.posix_spawn", posix_spawn), ("subprocess.Popen (vfork, close_fds)", popen)):
            walls, cpus = [], []
            for _ in range(COUNT):
                t0, c0 = time.perf_counter(), time.process_time()
                wait = spawn()
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                wait()
            rows[name] += [f"{statistics.median(walls) * 1000:.3f}", f"{statistics.median(cpus) * 1000:.3f}"]
    for fd in held:
        os.close(fd)
    for name, cells in rows.items():
        print(f"| {name} | {' | '.join(cells)} |")


def main() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    print(f"spawn cost, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    _part2()  # first: the spawner's client makes this process reap every child of its own
    _part1()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
