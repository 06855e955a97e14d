"""Test hosts: network namespaces of the test's own, joined by a bridge (iproute2).

One namespace holds the bridge (the switch); each host is a namespace with one veth into it
and an address from 198.18.0.0/24 (RFC 2544's range for benchmark networks). Nothing is added
to the root namespace: no link, no address, no route, so this traffic cannot leave the
machine. A process runs on a host through `nsenter --net`, which execs the command (its pid is
the command's) and leaves the mount namespace alone (`ip netns exec` would remount /sys and
hide the cgroup hierarchies gsrv uses). `close()` ends the processes started here, by pid,
and removes every namespace, which takes their links with them.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil

NETNS_DIR = Path("/run/netns")
SUBNET = "198.18.0"
_numbers = itertools.count(1)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


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
        proc: subprocess.Popen[Any] = subprocess.Popen([*self.prefix(host), *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """End what popen started (TERM, then KILL after 10 s), then remove every namespace."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns)
        self.namespaces.clear()

    def left(self) -> list[str]:
        """This net's namespaces that still exist (none after close)."""
        return sorted(p.name for p in NETNS_DIR.glob(f"{self.tag}-*")) if NETNS_DIR.is_dir() else []
