"""Issue 37's account of one short HTTP request, as bench/session_account.py does it for a raw
session: `ab -n 2000 -c 20` (a connection each) against each server in turn within a round
(interleaved rounds, medians), and per request the CPU of

- the machine: every process and the kernel (/proc/stat);
- the server's own processes: lighttpd; gsrv with its spawner and guardian; tcpserver;
- the commands: their rusage as reaped (lighttpd's CGI scripts, gsrv's spawner's children,
  tcpserver's `busybox httpd -i`);
- the client: ab, from this process's reaped children;
- the rest: what no process is charged for.

Servers: lighttpd 1.4 mod_cgi and gsrv `transport = "http"`, each running the same one-line
`sh` CGI script (bench/cgi_hosts.py's); busybox `httpd -i` behind tcpserver and behind gsrv
with `relay = "socket"` (its files from bench/peers/www).

Usage: python bench/http_account.py [--rounds 3] [--requests 2000] [--before DIR] [--out FILE]
--before DIR adds gsrv's rows again from the gsrv tree in DIR (another commit's). Only
processes this script started are ended; every server listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
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

import cgi_hosts
import measures
import psutil
import servers
from session_account import Account, own_cpu, publish

HTTPD = ["busybox", "httpd", "-i", "-h", os.path.join(servers.HERE, "peers", "www")]
Start = Callable[[str], tuple[subprocess.Popen[bytes], int, str]]  # tmp -> (process, port, path)


def _lighttpd(tmp: str) -> tuple[subprocess.Popen[bytes], int, str]:
    port = cgi_hosts.free_port()
    proc = cgi_hosts.lighttpd(0)(tmp, port)
    cgi_hosts.wait_port(port)
    return proc, port, "/hello.sh"


def _gsrv_cgi(source: str) -> Start:
    def start(tmp: str) -> tuple[subprocess.Popen[bytes], int, str]:
        root = cgi_hosts.www(tmp)
        config = os.path.join(tmp, "gsrv.toml")
        with open(config, "w") as f:
            f.write('[server]\nkill_grace = "1s"\ndrain_timeout = "1s"\n[services.hello]\nlisten = "127.0.0.1:0"\n'
                    f'command = ["{root}/hello.sh"]\ntransport = "http"\nmax_sessions = 1100\n'
                    'http = { path = "/hello.sh" }\n')  # fmt: skip
        env = {**os.environ, "PYTHONPATH": source} if source else None
        with open(os.path.join(tmp, "gsrv.log"), "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gsrv", "serve", "-c", config], stderr=log,
                                    stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        return proc, cgi_hosts.gsrv_address(tmp, "hello"), "/hello.sh"

    return start


def _tcpserver_httpd(tmp: str) -> tuple[subprocess.Popen[bytes], int, str]:
    proc = servers.tcpserver(HTTPD, tmp)
    return proc, servers.wait_listening(proc.pid)[1], "/index.html"


def _gsrv_httpd(source: str) -> Start:
    def start(tmp: str) -> tuple[subprocess.Popen[bytes], int, str]:
        proc = servers.gsrv(service='relay = "socket"\n', source=source)(HTTPD, tmp)
        return proc, servers.wait_listening(proc.pid)[1], "/index.html"

    return start


PEERS: dict[str, tuple[Start, str]] = {
    "lighttpd mod_cgi": (_lighttpd, "lighttpd mod_cgi (server.stream-request-body 0), a one-line sh CGI"),
    "gsrv CGI": (_gsrv_cgi(""), 'gsrv transport = "http", defaults, the same script'),
    "tcpserver httpd -i": (_tcpserver_httpd, "tcpserver ... busybox httpd -i, a file"),
    "gsrv socket httpd -i": (_gsrv_httpd(""), 'gsrv relay = "socket", defaults, busybox httpd -i'),
}


def _reaped(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def _ab(port: int, path: str, count: int) -> float:
    run = subprocess.run(["ab", "-q", "-n", str(count), "-c", "20", "-s", "30", f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    rate = re.search(r"Requests per second:\s+([\d.]+)", run.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", run.stdout)
    if not rate or not failed or failed.group(1) != "0":
        raise RuntimeError(f"ab: {(run.stderr or run.stdout)[-300:]}")
    return float(rate.group(1))


def measure(name: str, requests: int) -> Account:
    start = PEERS[name][0]
    with tempfile.TemporaryDirectory(prefix="gsrv-http-account-") as tmp:
        os.chmod(tmp, 0o755)
        proc, port, path = start(tmp)
        try:
            _ab(port, path, 200)  # warm: the spawner's pool, caches
            time.sleep(0.5)
            own = servers.server_processes(proc.pid)
            spawners = [p for p in own if servers.is_spawner(" ".join(p.cmdline()))]
            reapers = spawners or own  # gsrv's spawner reaps; lighttpd and tcpserver reap their own
            client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            own0, reaped0, machine0 = own_cpu(own), _reaped(reapers), psutil.cpu_times()
            rate = _ab(port, path, requests)
            time.sleep(0.3)  # the last reaps
            own1, reaped1, machine1 = own_cpu(own), _reaped(reapers), psutil.cpu_times()
            client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        finally:
            servers.stop(proc)
    per = 1000 / requests
    spent = {pid: own1.get(pid, t) - t for pid, t in own0.items()}
    spawner = sum(spent.get(p.pid, 0.0) for p in spawners)
    client = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
    machine = measures.busy(machine1) - measures.busy(machine0)
    return Account(rate, machine * per, sum(spent.values()) * per, (reaped1 - reaped0) * per, client * per,
                   spawner * per)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--before", default="", help="a gsrv tree to run beside this one, its rows 'before'")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    names = [n for n in PEERS if shutil.which(n.split()[0] if not n.startswith("gsrv") else "ab")]
    if args.before:
        PEERS["gsrv CGI (before)"] = (_gsrv_cgi(args.before), f"as gsrv CGI, from {args.before}")
        PEERS["gsrv socket httpd -i (before)"] = (_gsrv_httpd(args.before), f"as gsrv socket httpd -i, from "
                                                  f"{args.before}")  # fmt: skip
        names.insert(names.index("gsrv CGI"), "gsrv CGI (before)")
        names.insert(names.index("gsrv socket httpd -i"), "gsrv socket httpd -i (before)")
    found: dict[str, list[Account]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            found[name].append(measure(name, args.requests))
    lines = [
        f"`python bench/http_account.py --rounds {args.rounds} --requests {args.requests}"
        f"{' --before ' + args.before if args.before else ''}` ({time.strftime('%Y-%m-%d')}): `ab -n "
        f"{args.requests} -c 20` (a connection each), medians of {args.rounds} interleaved rounds; CPU in ms a "
        "request; each gsrv row's ratio is to the peer above it (lighttpd for CGI, tcpserver for httpd -i).",
        "",
        "| server | requests/s | / peer | machine | / peer | server's own | of it: spawner | commands | client "
        "| rest |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peer_of = {n: "lighttpd mod_cgi" if "CGI" in n else "tcpserver httpd -i" for n in names}
    medians = {n: {k: statistics.median(getattr(a, k) for a in found[n]) for k in
                   ("rate", "machine", "server", "spawner", "commands", "client", "rest")} for n in names}  # fmt: skip
    for name in names:
        m, peer = medians[name], medians.get(peer_of[name])
        rate = f"{m['rate'] / peer['rate']:.2f}" if peer and name.startswith("gsrv") else "-"
        cpu = f"{m['machine'] / peer['machine']:.2f}" if peer and name.startswith("gsrv") else "-"
        lines.append(f"| {name} | {m['rate']:,.0f} | {rate} | {m['machine']:.2f} | {cpu} | {m['server']:.2f} | "
                     f"{m['spawner']:.2f} | {m['commands']:.2f} | {m['client']:.2f} | {m['rest']:.2f} |")  # fmt: skip
    publish(lines, {name: PEERS[name][1] for name in names}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
