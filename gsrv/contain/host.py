"""What cgroups this host gives gsrv: the hierarchies mounted, the cgroup gsrv runs in on each,
and what can be made below it. Read from /proc/self/mountinfo and /proc/self/cgroup; no writes.

Two modes. "v1" (a v1 or hybrid host): one hierarchy per controller, a session's spawning
thread is placed in its cgroups for the fork. "v2" (the unified hierarchy alone, or a root
given on it): one tree, the child enters its cgroup through a small helper before the command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

# The v1 hierarchies gsrv uses: freezer (the kill: freeze, signal, thaw), pids, memory, cpu
# (limits and peaks), cpuacct (cpu_ms). freezer is required for v1 mode.
V1_HIERARCHIES = ("freezer", "pids", "memory", "cpuacct", "cpu")
V2_CORE = "core"  # what the unified hierarchy has without a controller: cgroup.kill, cgroup.freeze, cpu.stat

# What each feature needs, per mode: a hierarchy (v1) or a controller enabled in the tree (v2).
NEEDS: dict[str, dict[str, str]] = {
    "v1": {"kill": "freezer", "max_memory": "memory", "max_pids": "pids", "max_cpu": "cpu",
           "cpu_ms": "cpuacct", "mem_peak": "memory", "pids_peak": "pids"},
    "v2": {"kill": V2_CORE, "max_memory": "memory", "max_pids": "pids", "max_cpu": "cpu",
           "cpu_ms": V2_CORE, "mem_peak": "memory", "pids_peak": "pids"},
}  # fmt: skip


@dataclass(frozen=True)
class Mount:
    point: str
    root: str  # the cgroup path that the mount point shows (not "/" inside a cgroup namespace's bind)
    version: int
    controllers: frozenset[str]


@dataclass(frozen=True)
class Host:
    """mode "v1", "v2" or "none" (then `why` says what is missing); `parents`: the directory,
    per hierarchy, under which gsrv makes its own root; `has`: the hierarchies (v1) or the
    controllers that can be enabled there (v2), plus "core" on v2."""

    mode: str
    parents: dict[str, str] = field(default_factory=dict)
    has: frozenset[str] = frozenset()
    why: str = ""
    own: bool = True  # the parents are the cgroups gsrv runs in ("auto"), not a path given
    homes: dict[str, str] = field(default_factory=dict)  # the cgroups gsrv runs in, per hierarchy

    def can(self, feature: str) -> bool:
        return self.mode != "none" and NEEDS[self.mode][feature] in self.has

    def missing(self, feature: str) -> str:
        """What a feature lacks here, for a config error."""
        if self.mode == "none":
            return self.why
        need = NEEDS[self.mode][feature]
        if self.mode == "v1":
            return f"the v1 {need} hierarchy is not mounted or not writable (found: {', '.join(sorted(self.has))})"
        return (f"the {need} controller is not available in {self.parents['unified']} (cgroup.controllers: "
                f"{', '.join(sorted(self.has - {V2_CORE})) or 'none'})")  # fmt: skip

    def describe(self) -> str:
        if self.mode == "none":
            return f"none ({self.why})"
        where = " ".join(f"{name}={path}" for name, path in self.parents.items())
        found = ",".join(sorted(self.has - {V2_CORE})) or "no controllers"
        return f"{self.mode} ({found}) under {where}"


def mounts(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts of a mountinfo text."""
    found = []
    for line in text.splitlines():
        before, _, after = line.partition(" - ")
        parts, fs = before.split(), after.split()
        if len(parts) < 5 or len(fs) < 3 or fs[0] not in ("cgroup", "cgroup2"):
            continue
        options = set(fs[2].split(","))
        version = 2 if fs[0] == "cgroup2" else 1
        controllers = frozenset(options & set(V1_HIERARCHIES)) if version == 1 else frozenset()
        found.append(Mount(_unescape(parts[4]), _unescape(parts[3]), version, controllers))
    return found


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def memberships(text: str) -> dict[str, str]:
    """/proc/self/cgroup: controller (or "unified") -> the cgroup path."""
    own = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else ["unified"]:
            own[name] = path
    return own


def below(mount: Mount, cgroup: str) -> str | None:
    """The directory of a cgroup path in a mount, if the mount shows it."""
    root = mount.root.rstrip("/")
    if cgroup != root and not cgroup.startswith(root + "/"):
        return None
    return os.path.normpath(mount.point + cgroup[len(root) :])


def _usable(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def discover(root: str = "auto", mountinfo: str | None = None, cgroup: str | None = None) -> Host:
    """The host's cgroups for `[cgroup] root`: "auto" (the cgroups gsrv runs in) or a path."""
    try:
        if mountinfo is None:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
        if cgroup is None:
            with open("/proc/self/cgroup") as f:
                cgroup = f.read()
    except OSError as e:
        return Host("none", why=f"/proc is not readable ({e.strerror})")
    found, own = mounts(mountinfo), memberships(cgroup)
    homes = {}
    for m in found:
        for name in m.controllers or ({"unified"} if m.version == 2 else set()):
            path = below(m, own.get(name, "/"))
            if path is not None:
                homes[name] = path
    if root != "auto":
        return replace(_at_path(root, found), homes=homes)
    v1 = {name: path for name, path in homes.items() if name != "unified" and _usable(path)}
    if "freezer" in v1:
        return Host("v1", {name: v1[name] for name in V1_HIERARCHIES if name in v1}, frozenset(v1), homes=homes)
    if not found:
        return Host("none", why="no cgroup filesystem is mounted")
    path = homes.get("unified")
    if path is None:
        return Host("none", why="no writable v1 freezer hierarchy and no cgroup2 mount")
    if not _usable(path):
        return Host("none", why=f"the cgroup gsrv runs in ({path}) is not writable")
    return replace(_v2(path, own=True), homes=homes)


def _at_path(root: str, found: list[Mount]) -> Host:
    """A root given as a path: an existing cgroup directory (v2 mode on a cgroup2 mount; on a
    v1 mount, the same cgroup path in each v1 hierarchy)."""
    path = os.path.realpath(root)
    mount = max((m for m in found if path == m.point or path.startswith(m.point.rstrip("/") + "/")),
                key=lambda m: len(m.point), default=None)  # fmt: skip
    if mount is None or not os.path.isdir(path):
        return Host("none", why=f"{root} is not a directory on a cgroup filesystem", own=False)
    if not _usable(path):
        return Host("none", why=f"{root} is not writable", own=False)
    if mount.version == 2:
        return _v2(path, own=False)
    relative = path[len(mount.point) :]
    v1 = {}
    for m in found:
        for name in m.controllers:
            candidate = m.point + relative
            if _usable(candidate):
                v1[name] = candidate
    if "freezer" not in v1:
        return Host("none", why=f"{relative or '/'} is not a writable cgroup in the v1 freezer hierarchy", own=False)
    return Host("v1", {name: v1[name] for name in V1_HIERARCHIES if name in v1}, frozenset(v1), own=False)


def _kernel_at_least(major: int, minor: int) -> bool:
    numbers = os.uname().release.split("-")[0].split(".")
    try:
        return (int(numbers[0]), int(numbers[1])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def _v2(path: str, own: bool) -> Host:
    # A hierarchy's root cgroup has neither cgroup.kill nor cgroup.freeze of its own; the
    # cgroups gsrv makes below it have cgroup.kill from Linux 5.14 on.
    hierarchy_root = not os.path.exists(os.path.join(path, "cgroup.freeze"))
    has_kill = os.path.exists(os.path.join(path, "cgroup.kill")) or (hierarchy_root and _kernel_at_least(5, 14))
    if not has_kill:
        return Host("none", why=f"{path} has no cgroup.kill (kernel 5.14 or later needed)", own=own)
    try:
        with open(os.path.join(path, "cgroup.controllers")) as f:
            controllers = frozenset(f.read().split())
    except OSError:
        controllers = frozenset()
    return Host("v2", {"unified": path}, controllers | {V2_CORE}, own=own)
