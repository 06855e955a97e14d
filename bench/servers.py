"""The servers under test: gsrv and its peers, each started on 127.0.0.1 and a free port it
picks itself (found with psutil), each ended with every process below it, by PID."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
COMMAND: list[str] = []  # the command the servers under test run now: not part of "the server"


@dataclass
class Peer:
    name: str
    start: Callable[[list[str], str], subprocess.Popen[bytes]]
    needs: str  # the executable or module that must exist
    how: str  # the command line, for the results file

    def available(self) -> bool:
        if self.needs == "cgroups":
            from gsrv.contain.host import discover

            return discover().can("kill")
        if self.needs.startswith("module:"):
            try:
                __import__(self.needs.removeprefix("module:"))
            except ImportError:
                return False
            return True
        return shutil.which(self.needs) is not None


def wait_listening(pid: int, timeout: float = 15.0, ignore: int | None = None) -> tuple[str, int]:
    """The TCP address pid (or a process below it) listens on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                for conn in p.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr.port != ignore:
                        return conn.laddr.ip, conn.laddr.port
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"pid {pid} did not listen within {timeout}s")


def is_spawner(argv: str) -> bool:
    """gsrv's spawner, the Python one or the compiled one, by its command line."""
    return "gsrv.spawn.spawner" in argv or "gsrv-spawner" in argv


def gsrv(extra: str = "", service: str = "", source: str = "") -> Callable[[list[str], str], subprocess.Popen[bytes]]:
    """extra: lines for [server]; service: lines for the service's table; source: a tree of gsrv
    to run instead of the installed one (another commit's, for a before-and-after run)."""

    def start(command: list[str], tmp: str) -> subprocess.Popen[bytes]:
        config = os.path.join(tmp, "bench.toml")
        with open(config, "w") as f:
            f.write('[server]\nkill_grace = "1s"\ndrain_timeout = "1s"\n' + extra)
            f.write(f'[services.bench]\nlisten = "127.0.0.1:0"\ncommand = {command!r}\n'.replace("'", '"'))
            f.write("max_sessions = 1100\nbacklog = 2048\n" + service)
        with open(os.path.join(tmp, "gsrv.log"), "w") as log:
            env = {**os.environ, "PYTHONPATH": source} if source else None  # its spawner and guardian too
            return subprocess.Popen([sys.executable, "-m", "gsrv", "serve", "-c", config], stderr=log,
                                    stdin=subprocess.DEVNULL, env=env)  # fmt: skip

    return start


def admin_url(tmp: str, timeout: float = 10.0) -> str:
    """The admin endpoint of the gsrv whose log is in tmp (it logs the address it bound)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(os.path.join(tmp, "gsrv.log")) as f:
            found = re.search(r"event=admin_listening address=(\S+)", f.read())
        if found:
            return "http://" + found.group(1)
        time.sleep(0.02)
    raise RuntimeError("gsrv did not report its admin address")


def socat(buffer: int) -> Callable[[list[str], str], subprocess.Popen[bytes]]:
    def start(command: list[str], tmp: str) -> subprocess.Popen[bytes]:
        listen = "TCP-LISTEN:0,bind=127.0.0.1,reuseaddr,fork,backlog=1024"
        return subprocess.Popen(["socat", "-b", str(buffer), listen, "EXEC:" + " ".join(command)],
                                stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    return start


def tcpserver(command: list[str], tmp: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["tcpserver", "-c", "2000", "-b", "1024", "-R", "-H", "-l", "0", "127.0.0.1", "0",
                             *command], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def twisted(script: str) -> Callable[[list[str], str], subprocess.Popen[bytes]]:
    def start(command: list[str], tmp: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, os.path.join(HERE, "peers", script), *command],
                                stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    return start


GROUP = 'kill_scope = "group"\n'  # the baseline: the figures before containment stay comparable
CGROUP = 'kill_scope = "cgroup"\n'

PEERS = [
    Peer("gsrv", gsrv(service=GROUP), "module:gsrv",
         'gsrv serve, relay = "auto" (splice), kill_scope = "group", max_sessions 1100, backlog 2048'),
    Peer("gsrv copy", gsrv(service='relay = "copy"\n' + GROUP), "module:gsrv", 'the same with relay = "copy"'),
    Peer("gsrv socket", gsrv(service='relay = "socket"\n' + GROUP), "module:gsrv",
         'the same with relay = "socket" (the child holds the connection, as under tcpserver)'),
    Peer("gsrv pipe 128KiB", gsrv(service='pipe_size = "128KiB"\n' + GROUP), "module:gsrv",
         'the same as gsrv with pipe_size = "128KiB"'),
    Peer("gsrv cgroup", gsrv(service=CGROUP), "cgroups",
         'gsrv with kill_scope = "cgroup": a cgroup per session (needs root and cgroups)'),
    Peer("gsrv socket cgroup", gsrv(service='relay = "socket"\n' + CGROUP), "cgroups",
         'gsrv socket with kill_scope = "cgroup"'),
    Peer("socat -b 8192", socat(8192), "socat",
         "socat -b 8192 TCP-LISTEN:PORT,bind=127.0.0.1,reuseaddr,fork,backlog=1024 EXEC:CMD"),
    Peer("socat -b 65536", socat(65536), "socat",
         "socat -b 65536 TCP-LISTEN:PORT,bind=127.0.0.1,reuseaddr,fork,backlog=1024 EXEC:CMD"),
    Peer("tcpserver", tcpserver, "tcpserver", "tcpserver -c 2000 -b 1024 -R -H -l 0 127.0.0.1 PORT CMD"),
    Peer("Twisted naive", twisted("twisted_naive.py"), "module:twisted",
         "bench/peers/twisted_naive.py CMD (spawnProcess, every dataReceived written at once)"),
    Peer("Twisted P/C", twisted("twisted_pc.py"), "module:twisted",
         "bench/peers/twisted_pc.py CMD (producers/consumers both ways)"),
]  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a server we started and every process below it (by PID, collected first)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=5)


def _is_command(p: psutil.Process) -> bool:
    argv = p.cmdline()
    return (
        bool(argv)
        and bool(COMMAND)
        and argv[1:] == COMMAND[1:]
        and os.path.basename(argv[0]) == os.path.basename(COMMAND[0])
    )


def server_processes(pid: int) -> list[psutil.Process]:
    """The server's own processes (socat's forks, gsrv's guardian), not the commands they
    run nor what those start."""
    own: list[psutil.Process] = []

    def walk(p: psutil.Process) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.pid != pid and _is_command(p):
                return
            own.append(p)
            for child in p.children():
                walk(child)

    with contextlib.suppress(psutil.NoSuchProcess):
        walk(psutil.Process(pid))
    return own


def server_memory(pid: int, kind: str = "pss") -> int:
    total = 0
    for p in server_processes(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            info = p.memory_full_info() if kind == "pss" else p.memory_info()
            total += getattr(info, kind)
    return total


class CpuMeter:
    """Server CPU seconds over a window: live processes sampled, so short-lived forks count."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, tuple[float, float]] = {}  # pid -> (first, last) cpu seconds
        self.sample(baseline=True)

    def sample(self, baseline: bool = False) -> None:
        for p in server_processes(self.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                cpu = t.user + t.system
                first = self.seen.get(p.pid, (cpu if baseline else 0.0, 0.0))[0]  # a new fork starts at 0
                self.seen[p.pid] = (first, cpu)

    def seconds(self) -> float:
        return sum(last - first for first, last in self.seen.values())
