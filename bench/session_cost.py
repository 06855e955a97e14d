"""CPU per session, split by who spends it: the server's own process(es), the client (this
process), the children (the commands, and any fork of the server), the whole machine.
The sessions/s measure (10 bytes into `wc -c`, 20 at a time) on each server in turn.

Usage: python bench/session_cost.py [--sessions 2000] [--peers gsrv "socat -b 65536" ...]
Every server listens on 127.0.0.1; only processes this script started are ended.
"""

from __future__ import annotations

import argparse
import tempfile

import measures
import psutil
import servers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--peers", nargs="*", default=["gsrv", "socat -b 65536", "tcpserver"])
    args = parser.parse_args()
    command = ["wc", "-c"]
    n = args.sessions
    print("| server | sessions/s | server user ms | server sys ms | children ms | client ms | machine busy ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="gsrv-bench-") as tmp:
        for peer in [p for p in servers.PEERS if p.name in args.peers and p.available()]:
            proc = peer.start(command, tmp)
            try:
                address = servers.wait_listening(proc.pid)
                servers.COMMAND[:] = command
                server, me = psutil.Process(proc.pid), psutil.Process()
                s0, m0, t0 = server.cpu_times(), me.cpu_times(), psutil.cpu_times()
                rate = measures.sessions_per_s(address, proc.pid, n)["sessions/s"]
                s1, m1, t1 = server.cpu_times(), me.cpu_times(), psutil.cpu_times()
            finally:
                servers.stop(proc)
            children = (s1.children_user + s1.children_system) - (s0.children_user + s0.children_system)
            client = (m1.user + m1.system) - (m0.user + m0.system)
            per = 1000 / n
            user, system, machine = (
                (s1.user - s0.user) * per,
                (s1.system - s0.system) * per,
                measures.busy(t1) - measures.busy(t0),
            )
            print(f"| {peer.name} | {rate:,.0f} | {user:.3f} | {system:.3f} | {children * per:.3f} "
                  f"| {client * per:.3f} | {machine * per:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
