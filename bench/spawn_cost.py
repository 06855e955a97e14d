"""What one spawn blocks gsrv's loop for: gsrv's own Child.spawn (the stdlib Popen
constructor, vfork in C), beside the cases that lose vfork (a preexec_fn; user/group as
root) and gevent's Popen (fork in Python), each with few and with 4,000 open fds (about
1,000 live sessions). With cgroups (as root): the spawn into a session cgroup (v1: the
spawning thread placed; v2, on the unified hierarchy if there is one: the helper), and in
the bubblewrap sandbox. Each child is `true`, reaped (and its cgroup read and removed)
before the next spawn. Prints a Markdown table of median and p99 milliseconds.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import gevent
import gevent.subprocess

from gsrv.config.contain import CGROUP_SLOT, Containment, Sandbox
from gsrv.config.launch import Launch
from gsrv.contain import enter
from gsrv.contain.host import discover
from gsrv.contain.scope import Root
from gsrv.relay.child import Child, contain_in

COUNT = 300
TRUE = shutil.which("true") or "/bin/true"
ENV = {"PATH": os.defpath}


Spawn = Callable[[], Callable[[], None]]  # starts a child; returns what reaps it


def _gsrv(launcher: tuple[str, ...] = (), stage: str = "bench", root: Root | None = None) -> Spawn:
    names = iter(range(1, 10**9))
    contain = Containment(scope="cgroup") if root is not None else None

    def spawn() -> Callable[[], None]:
        contain_in(root)
        launch = Launch((*launcher, TRUE), launcher[0] if launcher else TRUE, (stage,) if launcher else (), -1, 1)
        child = Child.spawn(launch, ENV, None, "discard", 0, contain=contain, name=f"bench-{next(names)}")

        def reap() -> None:
            child.close_pipes()
            child.exited.wait(5)
            child.kill_scope.finish()

        return reap

    return spawn


def _contained() -> list[tuple[str, Spawn]]:
    """The cgroup cases this host has (root needed to make cgroups)."""
    cases: list[tuple[str, Spawn]] = []
    v1, v2 = discover(), discover("/sys/fs/cgroup/unified")
    for host, name in ((v1, "v1: the spawning thread placed"), (v2, "v2: the python -S helper first")):
        if host.mode == "none" or (name.startswith("v1") and host.mode != "v1"):
            continue
        root = Root(host)
        root.create()
        ROOTS.append(root)
        helper = (sys.executable, "-I", "-S", enter.__file__, CGROUP_SLOT) if host.mode == "v2" else ()
        cases.append((f"gsrv Child.spawn in a session cgroup ({name})", _gsrv(helper, "cgroup", root)))
    bwrap = shutil.which("bwrap")
    if bwrap:
        sandbox = (bwrap, *Sandbox(private_tmp=True).options(new_session=False), "--")
        cases.append(("gsrv Child.spawn in bwrap (private_tmp)", _gsrv(sandbox, "sandbox")))
        if ROOTS and ROOTS[0].host.mode == "v1":
            both = (bwrap, *Sandbox(private_tmp=True).options(new_session=True), "--")
            cases.append(("gsrv Child.spawn in a cgroup (v1) and bwrap", _gsrv(both, "sandbox", ROOTS[0])))
    return cases


ROOTS: list[Root] = []


def _popen(popen: Callable[..., subprocess.Popen[bytes]], **extra: object) -> Spawn:
    def spawn() -> Callable[[], None]:
        proc = popen([TRUE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                     close_fds=True, start_new_session=True, env=ENV, **extra)  # fmt: skip

        def reap() -> None:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
            proc.wait()

        return reap

    return spawn


def _time(spawn: Spawn) -> tuple[float, float, float]:
    """Median and p99 ms of the start alone (the time the loop is blocked), and the median
    ms from the start until the child has exited and is reaped (its execs included)."""
    times, totals = [], []
    for _ in range(COUNT):
        t0 = time.perf_counter()
        reap = spawn()
        times.append((time.perf_counter() - t0) * 1000)
        reap()
        totals.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)], statistics.median(totals)


def main() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    cases: list[tuple[str, Spawn]] = [
        ("gsrv Child.spawn (stdlib Popen, vfork)", _gsrv()),
        ("stdlib Popen with preexec_fn (fork)", _popen(subprocess.Popen, preexec_fn=lambda: None)),
        ("gevent.subprocess.Popen (fork in Python)", _popen(gevent.subprocess.Popen)),
    ]
    prlimit = (shutil.which("prlimit") or "/usr/bin/prlimit", "--nofile=1024:1024", "--fsize=1073741824:1073741824",
               "--cpu=60:60", "--")  # fmt: skip
    setpriv = (shutil.which("setpriv") or "/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--init-groups", "--")
    cases.insert(1, ("gsrv Child.spawn, rlimits: prlimit prefix (vfork)", _gsrv(prlimit)))
    if os.geteuid() == 0:
        cases.insert(2, ("gsrv Child.spawn, user: setpriv prefix (vfork, as root)", _gsrv(setpriv)))
        cases.insert(3, ("gsrv Child.spawn, rlimits + user: both prefixes (vfork, as root)", _gsrv(prlimit + setpriv)))
        cases.insert(
            5, ("stdlib Popen with user/group (fork, as root)", _popen(subprocess.Popen, user=65534, group=65534))
        )
    if os.geteuid() == 0:
        cases[1:1] = _contained()
    rows = {name: [] for name, _ in cases}  # type: dict[str, list[str]]
    held: list[int] = []
    for fds in (0, 4000):
        while len(held) < fds:
            held.extend(os.pipe())
        for name, spawn in cases:
            spawn()()  # warm up
            median, p99, total = _time(spawn)
            rows[name].append(f"{median:.2f} / {p99:.2f} | {total:.2f}")
    for fd in held:
        os.close(fd)
    contain_in(None)
    for root in ROOTS:
        root.remove()
    print(f"\nspawn cost, {COUNT} spawns of `true` each, Python {sys.version.split()[0]}: "
          "ms the caller is blocked (the start, to the child's exec), median / p99; and ms from "
          "the start to the child's exit, its execs included, median\n")  # fmt: skip
    print("| spawn | blocked, few fds | to exit | blocked, 4,000 open fds | to exit |")
    print("|---|---:|---:|---:|---:|")
    for name, cells in rows.items():
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
