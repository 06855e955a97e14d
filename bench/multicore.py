"""Sessions/s of 1 vs 2 gsrv processes sharing ONE listening socket (as supervisord's
fcgi-program and systemd pass it), with each process's CPU per session and what that predicts
for N cores. The sessions/s measure: 10 bytes into `wc -c`, 20 at a time, every reply checked.

Usage: python bench/multicore.py [--rounds 3] [--sessions 3000] [--out bench/results/multicore.md]
This script binds the socket on 127.0.0.1 itself, starts the gsrv processes on it (listen =
"fd:N") and ends only them, by PID. The load generator runs here, on the same cores: its CPU
and the children's are reported beside gsrv's.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import measures
import psutil
import servers

COMMAND = ["wc", "-c"]


@dataclass
class Round:
    processes: int
    rate: float  # sessions/s
    gsrv_ms: list[float]  # each gsrv process's CPU (its own, not its children's) per session it served
    share: list[float]  # the fraction of sessions each process served
    children_ms: float  # the commands (wc), per session
    client_ms: float  # this process, per session
    machine_ms: float  # every core's busy time, per session


def _start(listener: socket.socket, n: int, tmp: str) -> list[subprocess.Popen[bytes]]:
    fd = listener.fileno()
    procs = []
    for k in range(n):
        config = os.path.join(tmp, f"multi-{k}.toml")
        with open(config, "w") as f:
            f.write('[server]\nkill_grace = "1s"\ndrain_timeout = "1s"\n')
            f.write(f'[services.bench]\nlisten = "fd:{fd}"\ncommand = ["wc", "-c"]\nmax_sessions = 1100\n')
            f.write('kill_scope = "group"\n')  # as the bench's plain "gsrv" peer
        log = open(os.path.join(tmp, f"multi-{k}.log"), "w")  # noqa: SIM115 (the process writes it)
        procs.append(subprocess.Popen([sys.executable, "-m", "gsrv", "serve", "-c", config], stderr=log,
                                      stdin=subprocess.DEVNULL, pass_fds=(fd,)))  # fmt: skip
        log.close()
    try:
        for k in range(n):
            deadline = time.monotonic() + 20
            while "event=listening" not in _log(tmp, k):
                if time.monotonic() > deadline or procs[k].poll() is not None:
                    raise RuntimeError(f"gsrv process {k} did not listen: {_log(tmp, k)[-2000:]}")
                time.sleep(0.05)
    except BaseException:
        for proc in procs:
            servers.stop(proc)
        raise
    return procs


def _log(tmp: str, k: int) -> str:
    with open(os.path.join(tmp, f"multi-{k}.log")) as f:
        return f.read()


def _served(tmp: str, k: int) -> int:
    return _log(tmp, k).count("event=session_end")


def measure(n: int, sessions: int) -> Round:
    with tempfile.TemporaryDirectory(prefix="gsrv-multicore-") as tmp, socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2048)
        address = listener.getsockname()
        procs = _start(listener, n, tmp)
        try:
            ps = [psutil.Process(p.pid) for p in procs]
            me = psutil.Process()
            before = [p.cpu_times() for p in ps]
            m0, t0 = me.cpu_times(), psutil.cpu_times()
            served0 = [_served(tmp, k) for k in range(n)]
            rate = measures.sessions_per_s(address, procs[0].pid, sessions)["sessions/s"]
            after = [p.cpu_times() for p in ps]
            m1, t1 = me.cpu_times(), psutil.cpu_times()
            time.sleep(0.3)  # the last session_end lines
            served = [_served(tmp, k) - served0[k] for k in range(n)]
        finally:
            for proc in procs:
                servers.stop(proc)
    per = 1000 / sessions
    own = [((a.user - b.user) + (a.system - b.system)) * 1000 / max(1, k)
           for a, b, k in zip(after, before, served, strict=True)]  # fmt: skip
    kids = sum((a.children_user + a.children_system) - (b.children_user + b.children_system)
               for a, b in zip(after, before, strict=True))  # fmt: skip
    return Round(n, rate, own, [s / max(1, sum(served)) for s in served], kids * per,
                 ((m1.user + m1.system) - (m0.user + m0.system)) * per,
                 (measures.busy(t1) - measures.busy(t0)) * per)  # fmt: skip


def report(rounds: list[Round], cores: int) -> str:
    title = f"# 1 vs 2 gsrv processes on one shared socket ({cores} cores, load generator on the same cores)"
    header = ("| processes | sessions/s (median) | rounds | gsrv CPU ms per session it served, each process "
              "| share of sessions | children ms | client ms | machine busy ms |")  # fmt: skip
    lines = [title, "", header, "|---:|---:|---|---|---|---:|---:|---:|"]
    busy = ('"machine busy" is every core\'s busy time, whatever ran it: a run beside other work inflates '
            "it, and the rates it predicts fall.")  # fmt: skip
    medians = {}
    for n in sorted({r.processes for r in rounds}):
        mine = [r for r in rounds if r.processes == n]
        rate = statistics.median(r.rate for r in mine)
        server_side = statistics.median(r.machine_ms - r.client_ms for r in mine)
        gsrv_ms = statistics.median(sum(ms * f for ms, f in zip(r.gsrv_ms, r.share, strict=True)) for r in mine)
        medians[n] = (rate, gsrv_ms, server_side)
        each = " / ".join(f"{statistics.median(r.gsrv_ms[k] for r in mine):.3f}" for k in range(n))
        share = " / ".join(f"{statistics.median(r.share[k] for r in mine):.0%}" for k in range(n))
        lines.append(f"| {n} | {rate:,.0f} | {', '.join(f'{r.rate:,.0f}' for r in mine)} | {each} | {share} "
                     f"| {statistics.median(r.children_ms for r in mine):.3f} "
                     f"| {statistics.median(r.client_ms for r in mine):.3f} "
                     f"| {statistics.median(r.machine_ms for r in mine):.3f} |")  # fmt: skip
    if 1 in medians and 2 in medians:
        lines += ["", f"2 processes / 1 process: {medians[2][0] / medians[1][0]:.2f}x"]
    _, gsrv1, server1 = medians[min(medians)]
    cap = 1000 / gsrv1  # one process on a core of its own
    lines += ["", f"One gsrv process spends {gsrv1:.3f} ms of CPU per session: on a core of its own it tops out "
              f"near {cap:,.0f} sessions/s. The server machine's whole cost per session (gsrv, the command, "
              f"the kernel; the client's CPU left out) is {server1:.3f} ms. So with P gsrv processes on N cores "
              f"and the clients on other machines, expect min(P x {cap:,.0f}, N x 1000 / {server1:.3f}) "
              "sessions/s:"]  # fmt: skip
    lines += ["", "| cores N (P = N processes) | expected sessions/s | bound by |", "|---:|---:|---|"]
    for n in (2, 4, 8, 16):
        gsrv_bound, machine_bound = n * cap, n * 1000 / server1
        bound = "the gsrv processes" if gsrv_bound <= machine_bound else "the cores (commands and kernel too)"
        lines.append(f"| {n} | {min(gsrv_bound, machine_bound):,.0f} | {bound} |")
    return "\n".join([*lines, "", busy]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--out", default=os.path.join(servers.HERE, "results", "multicore.md"))
    args = parser.parse_args()
    rounds = [measure(n, args.sessions) for _ in range(args.rounds) for n in (1, 2)]  # interleaved
    text = report(rounds, psutil.cpu_count() or 1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                text + f"\nMeasured with: python bench/multicore.py --rounds {args.rounds} --sessions {args.sessions}\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
