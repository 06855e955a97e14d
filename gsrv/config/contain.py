"""Containment keys: `[cgroup] root`, and per service kill_scope, the session limits (max_memory,
max_pids, max_cpu) and the bubblewrap sandbox. Checked at load against what the host has
(gsrv/contain/host.py): a key the host cannot honour is an error naming what is missing.

The sandbox is an argv prefix (`bwrap ... --`), one stage of config/launch.py's pipeline like
prlimit and setpriv.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from gsrv.config import keys
from gsrv.config.keys import key
from gsrv.config.table import Table
from gsrv.config.units import describe, format_size
from gsrv.contain.host import Host, discover
from gsrv.contain.scope import Limits

PID_MAX_LIMIT = 4 * 1024**2  # the kernel's ceiling for pid_max on 64-bit
MIN_MEMORY = 4 * 1024**2  # the spawner's pages touched while it is in the session's cgroup count there too
SANDBOX_KEYS = ("private_tmp", "private_network", "read_only_paths", "writable_paths")


def _root(t: Table, name: str, default: object) -> str:
    root = t.data.get(name, default)
    if not isinstance(root, str) or not (root == "auto" or root.startswith("/")):
        raise t.fail(name, f'must be "auto" or the absolute path of a cgroup directory (got {describe(root)})')
    return root


@dataclass(frozen=True)
class CgroupConfig:
    root: str = key(_root, "auto", '"auto" (below the cgroup gsrv runs in, per hierarchy) or a cgroup directory; '
                    "gsrv makes gsrv-<pid> there and a cgroup per session in it",
                    reload="cannot change: a reload that changes it is refused (restart gsrv)", shown=True)  # fmt: skip
    host: Host = Host("none", why="not looked up")  # derived at load: what the host has under root


def parse_cgroup(t: Table, running: CgroupConfig | None = None) -> CgroupConfig:
    """On reload (`running` given) the same root keeps the host found at start: the cgroups
    in use decide what sessions get, not what a second look (after gsrv moved itself into
    its v2 leaf, say) would see."""
    root = keys.read_all(t, CgroupConfig)["root"]
    if running is not None and running.root == root:
        return running
    return CgroupConfig(root=root, host=discover(root))


@dataclass(frozen=True)
class Sandbox:
    private_tmp: bool = False
    private_network: bool = False
    read_only_paths: tuple[str, ...] = ()
    writable_paths: tuple[str, ...] = ()

    def options(self, new_session: bool) -> list[str]:
        """bwrap's options, in the order its mounts stack: the host's / as it is, the read-only
        paths over it, a private /tmp, the writable paths over those, a minimal /dev."""
        argv = ["--bind", "/", "/"]
        for path in self.read_only_paths:
            argv += ["--ro-bind", path, path]
        if self.private_tmp:
            argv += ["--tmpfs", "/tmp"]
        for path in self.writable_paths:
            argv += ["--bind", path, path]
        argv += ["--dev", "/dev"]  # last: a bind of / over it would bring back the host's /dev, mounted nodev
        if self.private_network:
            argv.append("--unshare-net")  # a network namespace whose own loopback bwrap brings up
        if new_session:
            argv.append("--new-session")
        return argv


def _sandbox(t: Table, name: str, default: object) -> Sandbox | None:
    data = t.data.get(name, default)
    if data is None:
        return None
    if not isinstance(data, dict):
        raise t.fail(name, f"must be a table like {{ private_tmp = true }} (got {describe(data)})")
    inner = Table(t.file, f"{t.name}.{name}", data, SANDBOX_KEYS)
    values: dict[str, object] = {}
    for flag in ("private_tmp", "private_network"):
        value = data.get(flag, False)
        if not isinstance(value, bool):
            raise inner.fail(flag, f"must be true or false (got {describe(value)})")
        values[flag] = value
    for paths in ("read_only_paths", "writable_paths"):
        listed = inner.strings(paths, ())
        for path in listed:
            if not (path.startswith("/") and os.path.exists(path)):
                raise inner.fail(paths, f'must list existing absolute paths (got "{path}")')
        values[paths] = listed
    return Sandbox(**values)  # type: ignore[arg-type]


def _show_sandbox(sandbox: Sandbox | None) -> str:
    if sandbox is None:
        return "none"
    parts = [k for k in ("private_tmp", "private_network") if getattr(sandbox, k)]
    parts += [
        f"{k}={','.join(getattr(sandbox, k))}" for k in ("read_only_paths", "writable_paths") if getattr(sandbox, k)
    ]
    return "+".join(parts) or "bwrap"


def _pids(t: Table, name: str, default: object) -> int:
    value = t.data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= PID_MAX_LIMIT:
        raise t.fail(name, f"must be 0 (no limit) or a count up to {PID_MAX_LIMIT:,} (got {describe(value)})")
    return value


def _cpus(t: Table, name: str, default: object) -> float:
    value = t.data.get(name, default)
    ceiling = os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value == 0 or 0.01 <= value <= ceiling):
        raise t.fail(name, f"must be 0 (no limit) or CPUs between 0.01 and {ceiling}, like 0.5 (got {describe(value)})")
    return float(value)


@dataclass(frozen=True)
class Containment:
    """A service's containment keys (keys of its [services.NAME] table) and what they derive."""

    kill_scope: str = key(keys.choice("auto", "cgroup", "group"), "auto", '"auto" (cgroup where the host has '
                          'cgroups, else group) | "cgroup" (every process of the session, daemons included) | '
                          '"group" (the child\'s process group)', show=str)  # fmt: skip
    max_memory: int = key(keys.size(0, 2**50), 0, "the session's whole tree, in its cgroup (OOM-killed above); "
                          "0 = no limit", example="64MiB", show=lambda v: format_size(v) if v else "none")  # fmt: skip
    max_pids: int = key(_pids, 0, "processes of the session at once (a fork beyond fails); 0 = no limit",
                        example=32)  # fmt: skip
    max_cpu: float = key(_cpus, 0, "CPUs the session's tree may use, like 0.5; 0 = no limit", example=0.5,
                         show=lambda v: f"{v:g}")  # fmt: skip
    accounting: bool = key(keys.flag(), False, "count each session's cpu_ms, mem_peak and pids_peak in its cgroups "
                           "(on v1 three more cgroups a session: cpuacct, memory, pids); off, the line still has the "
                           "spawner's ru_cpu_ms", show=lambda v: "on" if v else "off")  # fmt: skip
    sandbox: Sandbox | None = key(_sandbox, None, "run the command in bubblewrap: { private_tmp, private_network, "
                                  "read_only_paths, writable_paths }", value=None, show=_show_sandbox,
                                  example={"private_tmp": True, "private_network": True})  # fmt: skip
    scope: str = "group"  # derived: the kill scope in force, "cgroup" or "group"
    limits: Limits = Limits()  # derived
    stages: tuple[tuple[str, tuple[str, ...]], ...] = ()  # derived: the sandbox


def parse_containment(t: Table, cgroup: CgroupConfig, environ: dict[str, str], pty: bool = False) -> Containment:
    values = keys.read_all(t, Containment)
    host = cgroup.host
    scope = values["kill_scope"]
    if scope == "cgroup" and not host.can("kill"):
        raise t.fail("kill_scope", f'is "cgroup", which this host cannot give: {host.missing("kill")}')
    if scope == "auto":
        scope = "cgroup" if host.can("kill") else "group"
    limits = Limits(values["max_memory"], values["max_pids"], values["max_cpu"])
    for name, value in (("max_memory", limits.memory), ("max_pids", limits.pids), ("max_cpu", limits.cpu)):
        if not value:
            continue
        if scope != "cgroup":
            why = 'kill_scope is "group"' if values["kill_scope"] == "group" else host.missing("kill")
            raise t.fail(name, f"bounds the session's cgroup, and this service has none: {why}")
        if not host.can(name):
            raise t.fail(name, f"cannot be enforced on this host: {host.missing(name)}")
    if values["accounting"] and scope != "cgroup":
        why = 'kill_scope is "group"' if values["kill_scope"] == "group" else host.missing("kill")
        raise t.fail("accounting", f"counts in the session's cgroup, and this service has none: {why}")
    if values["accounting"] and not host.can("cpu_ms"):
        raise t.fail("accounting", f"cannot count on this host: {host.missing('cpu_ms')}")
    if limits.memory and limits.memory < MIN_MEMORY:
        raise t.fail("max_memory", f"must be 0 or at least 4MiB (got {describe(t.data['max_memory'])})")
    stages = []
    sandbox = values.setdefault("sandbox", None)
    if sandbox is not None:
        path = environ.get("PATH", os.defpath)
        bwrap = shutil.which("bwrap", path=path)
        if bwrap is None:
            raise t.fail("sandbox", f"needs bubblewrap's bwrap, which is not on PATH ({path}; Debian: apt-get "
                         "install bubblewrap)")  # fmt: skip
        # --new-session would take the command out of the process group the ladder signals, and
        # out of the session its pty leads (there TIOCSTI can reach only the session's own terminal)
        new_session = scope == "cgroup" and not pty
        stages.append(("sandbox", (os.path.abspath(bwrap), *sandbox.options(new_session), "--")))
    return Containment(**values, scope=scope, limits=limits, stages=tuple(stages))
