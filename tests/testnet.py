"""Test hosts: network namespaces of the test's own, joined by a bridge (iproute2).

One namespace holds the bridge (the switch); each host is a namespace with one veth into it
and an address from 198.18.0.0/24 (RFC 2544's range for benchmark networks). Nothing is added
to the root namespace: no link, no address, no route, so this traffic cannot leave the
machine. A process runs on a host through `nsenter --net`, which execs the command (its pid is
the command's) and leaves the mount namespace alone (`ip netns exec` would remount /sys and
hide the cgroup hierarchies gsrv uses). Each process started here gets SIGKILL if the test
process dies (PR_SET_PDEATHSIG: pytest-timeout's thread method ends pytest with os._exit).
`close()` ends the processes started here, by pid, and removes every namespace, which takes
their links with them; a process still inside one then is killed and reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

NETNS_DIR = Path("/run/netns")
SUBNET = "198.18.0"
_numbers = itertools.count(1)


PR_SET_PDEATHSIG = 1


def _ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def die_with_parent() -> None:
    """A preexec_fn: SIGKILL this process when the test process dies (kept across exec)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _empty(ns: str, wait: float = 0.0) -> list[int]:
    """Kill what still runs in namespace ns after `wait` seconds (a guardian may still be
    ending what its gsrv left; only this module's namespaces get here): their pids."""
    deadline = time.monotonic() + wait
    pids = [int(p) for p in _ip("netns", "pids", ns).split()]
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = [int(p) for p in _ip("netns", "pids", ns).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def available() -> str | None:
    """Why test hosts cannot be made here, or None."""
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        return "ip (iproute2) and nsenter (util-linux) are needed: apt-get install iproute2 util-linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    return None


def sweep() -> list[str]:
    """Remove the namespaces that an earlier run of this module left behind (its pid is gone)."""
    removed = []
    for path in NETNS_DIR.glob("gsrvt*") if NETNS_DIR.is_dir() else []:
        m = re.fullmatch(r"gsrvt(\d+)x\d+-\w+", path.name)
        if m and not psutil.pid_exists(int(m.group(1))):
            _empty(path.name)
            _ip("netns", "del", path.name)
            removed.append(path.name)
    return removed


class TestNet:
    """Hosts by name, each with the address SUBNET.<number> given for it."""

    def __init__(self, hosts: dict[str, int]) -> None:
        self.tag = f"gsrvt{os.getpid()}x{next(_numbers)}"
        self.hosts = dict(hosts)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        try:
            switch = self._namespace("sw")
            _ip("-n", switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", switch, "link", "set", "br0", "up")
            for host, number in self.hosts.items():
                ns = self._namespace(host)
                _ip("-n", switch, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", switch, "link", "set", host, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{SUBNET}.{number}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def _namespace(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        return ns

    def address(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts[host]}"

    def prefix(self, host: str) -> list[str]:
        """The argv that runs the rest of a command on `host`."""
        return ["nsenter", f"--net={NETNS_DIR / f'{self.tag}-{host}'}"]

    def popen(self, host: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen([*self.prefix(host), *argv], preexec_fn=die_with_parent,
                                                       **kwargs)  # fmt: skip
        self.procs.append(proc)
        return proc

    def end_processes(self) -> None:
        """End what popen started: TERM, then KILL after 10 s."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def close(self) -> None:
        """End what popen started, then remove every namespace, each one even when another
        fails; raises after, naming what was left running or could not be removed."""
        problems: list[str] = []
        try:
            self.end_processes()
        finally:
            for ns in reversed(self.namespaces):
                try:
                    left = _empty(ns, wait=5.0)
                    if left:
                        problems.append(f"{ns}: still running at the end, killed: {left}")
                    _ip("netns", "del", ns)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    problems.append(str(e))
            self.namespaces.clear()
        if problems:
            raise RuntimeError("test hosts: " + "; ".join(problems))

    def left(self) -> list[str]:
        """This net's namespaces that still exist (none after close)."""
        return sorted(p.name for p in NETNS_DIR.glob(f"{self.tag}-*")) if NETNS_DIR.is_dir() else []
