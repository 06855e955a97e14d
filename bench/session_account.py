"""Issue 37's account of what one short session costs the whole machine: 2,000 × 10 B into
`wc -c`, 20 at a time, each server in turn within a round (interleaved rounds, medians), and
per session the CPU of

- the machine: every process and the kernel, user + system + irq + softirq (/proc/stat);
- the server's own processes: gsrv with its spawner and guardian; tcpserver itself; socat with
  its forks (which relay the bytes) and the commands they reap, since socat's parent is
  charged for both and they cannot be told apart;
- the session commands: their rusage as reaped (gsrv's spawner reaps them, tcpserver itself);
- the client: this process, which runs every connection;
- the rest: what no process is charged for (softirq, cgroup teardown, RCU, the scheduler).

Usage: python bench/session_account.py [--rounds 3] [--sessions 2000] [--peers NAME ...]
       [--before DIR] [--out bench/results/session_account.md]
--before DIR adds a "before" row for each gsrv server, run from the gsrv tree in DIR (another
commit's: `git archive COMMIT | tar -x -C DIR`), interleaved with the rest in each round.
Every server listens on 127.0.0.1; only processes this script started are ended.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import measures
import psutil
import servers

GROUP, ACCOUNTING = 'kill_scope = "group"\n', "accounting = true\n"
SERVICES = {  # gsrv's servers: the lines of their service table
    "gsrv socket": 'relay = "socket"\n', "gsrv socket group": 'relay = "socket"\n' + GROUP,
    "gsrv socket accounting": 'relay = "socket"\n' + ACCOUNTING, "gsrv splice": "", "gsrv copy": 'relay = "copy"\n',
}  # fmt: skip
PEERS: dict[str, tuple[Callable[..., object], str]] = {
    "tcpserver": (servers.tcpserver, "tcpserver -c 2000 -b 1024 -R -H -l 0 127.0.0.1 PORT wc -c"),
    "socat": (servers.socat(65536), "socat -b 65536 TCP-LISTEN:PORT,...,fork EXEC:wc -c"),
    "gsrv socket": (servers.gsrv(service=SERVICES["gsrv socket"]), 'gsrv, relay = "socket", defaults'),
    "gsrv socket group": (servers.gsrv(service=SERVICES["gsrv socket group"]), '... kill_scope = "group"'),
    "gsrv socket accounting": (servers.gsrv(service=SERVICES["gsrv socket accounting"]), "... accounting = true"),
    "gsrv splice": (servers.gsrv(service=SERVICES["gsrv splice"]), 'gsrv, relay = "auto" (splice), defaults'),
    "gsrv copy": (servers.gsrv(service=SERVICES["gsrv copy"]), 'gsrv, relay = "copy", defaults'),
}  # fmt: skip


@dataclass
class Account:
    """One server's account (bench/http_account.py's too, per request)."""

    rate: float  # sessions/s
    machine: float  # CPU ms a session, each of these
    server: float
    commands: float
    client: float
    spawner: float = 0.0  # gsrv's: of `server`, its spawner's part, and its guardian's
    guardian: float = 0.0

    @property
    def rest(self) -> float:
        return self.machine - self.server - self.commands - self.client


def own_cpu(processes: list[psutil.Process]) -> dict[int, float]:
    """Each process's CPU seconds so far, by pid (one gone is left out)."""
    found = {}
    for p in processes:
        try:
            t = p.cpu_times()
            found[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return found


def _reaped(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.children_user + t.children_system


def measure(name: str, sessions: int) -> Account:
    start = PEERS[name][0]
    with tempfile.TemporaryDirectory(prefix="gsrv-account-") as tmp:
        proc = start(["wc", "-c"], tmp)  # type: ignore[operator]
        try:
            address = servers.wait_listening(proc.pid)
            servers.COMMAND[:] = ["wc", "-c"]
            measures.sessions_per_s(address, proc.pid, 200)  # warm: the spawner's pool, caches
            time.sleep(0.5)
            root = psutil.Process(proc.pid)
            own = servers.server_processes(proc.pid)  # gsrv, spawner, guardian; tcpserver; socat
            role = {p.pid: _role(p) for p in own}
            reaper = next((p for p in own if servers.is_spawner(" ".join(p.cmdline()))), root)
            me = psutil.Process()
            own0, reaped0, me0, machine0 = own_cpu(own), _reaped(reaper), me.cpu_times(), psutil.cpu_times()
            rate = measures.sessions_per_s(address, proc.pid, sessions)["sessions/s"]
            time.sleep(0.3)  # the last reaps
            own1, reaped1, me1, machine1 = own_cpu(own), _reaped(reaper), me.cpu_times(), psutil.cpu_times()
        finally:
            servers.stop(proc)
    per = 1000 / sessions
    spent = {pid: own1.get(pid, t) - t for pid, t in own0.items()}
    server = sum(spent.values())
    spawner = sum(t for pid, t in spent.items() if role.get(pid) == "spawner")
    guardian = sum(t for pid, t in spent.items() if role.get(pid) == "guardian")
    if name == "socat":  # its forks relay, then reap the commands: charged to the parent together
        server += reaped1 - reaped0
        commands = 0.0
    else:
        commands = reaped1 - reaped0
    client = (me1.user + me1.system) - (me0.user + me0.system)
    machine = measures.busy(machine1) - measures.busy(machine0)
    return Account(rate, machine * per, server * per, commands * per, client * per, spawner * per, guardian * per)


def _role(p: psutil.Process) -> str:
    try:
        argv = " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return "gone"
    return "spawner" if servers.is_spawner(argv) else "guardian" if "gsrv.spawn.guardian" in argv else "server"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--peers", nargs="*", default=list(PEERS))
    parser.add_argument("--out", default="")
    parser.add_argument("--before", default="", help="a gsrv tree to run beside this one, its rows 'before'")
    args = parser.parse_args()
    if args.before:
        peers = list(args.peers)
        for name in peers:
            if name.startswith("gsrv "):
                service = SERVICES[name]
                PEERS[f"{name} (before)"] = (servers.gsrv(service=service, source=args.before), f"as {name}, "
                                             f"from {args.before}")  # fmt: skip
                args.peers.insert(args.peers.index(name), f"{name} (before)")
    found: dict[str, list[Account]] = {name: [] for name in args.peers}
    for _ in range(args.rounds):
        for name in args.peers:
            found[name].append(measure(name, args.sessions))
    base = statistics.median(a.rate for a in found["tcpserver"]) if "tcpserver" in found else 0.0
    base_cpu = statistics.median(a.machine for a in found["tcpserver"]) if "tcpserver" in found else 0.0
    lines = [
        f"`python bench/session_account.py --rounds {args.rounds} --sessions {args.sessions}"
        f"{' --before ' + args.before if args.before else ''}` "
        f"({time.strftime('%Y-%m-%d')}): {args.sessions} × 10 B into `wc -c`, 20 at a time, medians of "
        f"{args.rounds} interleaved rounds; CPU in ms a session.",
        "",
        "| server | sessions/s | / tcpserver | machine | / tcpserver | server's own | of it: spawner, guardian "
        "| commands | client | rest |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, accounts in found.items():
        m = {k: statistics.median(getattr(a, k) for a in accounts) for k in
             ("rate", "machine", "server", "commands", "client", "rest", "spawner", "guardian")}  # fmt: skip
        ratio = f"{m['rate'] / base:.2f}" if base else "-"
        cpu_ratio = f"{m['machine'] / base_cpu:.2f}" if base_cpu else "-"
        lines.append(f"| {name} | {m['rate']:,.0f} | {ratio} | {m['machine']:.2f} | {cpu_ratio} | "
                     f"{m['server']:.2f} | {m['spawner']:.2f}, {m['guardian']:.2f} | {m['commands']:.2f} | "
                     f"{m['client']:.2f} | {m['rest']:.2f} |")  # fmt: skip
    publish(lines, {name: PEERS[name][1] for name in found}, args.out)
    return 0


def publish(table: list[str], servers_named: dict[str, str], out: str) -> None:
    """The table, then what each server was; printed, and written to `out` if given."""
    text = "\n".join([*table, "", "Servers:", *(f"- {name}: {how}" for name, how in servers_named.items())]) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    raise SystemExit(main())
