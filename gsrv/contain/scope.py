"""One session's cgroups: the shape the spawner makes them in ahead of time (`Shape`: where,
their limits, how a process enters), and once a session has them, the kill's parts and the
accounting (`Scope`, one class per cgroup version). Plain file operations: nothing here waits
or signals.

A session gets the cgroups its service's keys need, no more: the kill's (v1 freezer, or the
v2 core), the controller of each limit, and with `accounting` the counters (v1 cpuacct,
memory, pids).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from gsrv.contain.cgfiles import field, freeze, has_cgroups_below, number, read, tasks, unique, write
from gsrv.contain.host import NEEDS
from gsrv.contain.root import Root

CPU_PERIOD_US = 100_000
V1_COUNTERS = frozenset({"cpuacct", "memory", "pids"})  # accounting: cpu_ms, mem_peak, pids_peak


@dataclass(frozen=True)
class Limits:
    """A session's limits; 0 is none."""

    memory: int = 0
    pids: int = 0
    cpu: float = 0.0

    def controllers(self, mode: str) -> set[str]:
        needs = NEEDS[mode]
        wanted = {"max_memory": self.memory, "max_pids": self.pids, "max_cpu": self.cpu}
        return {needs[feature] for feature, value in wanted.items() if value}


@dataclass(frozen=True)
class Usage:
    """What a session's cgroup counted; None where this host has no such counter or the
    service does not count it (`accounting`)."""

    cpu_ms: float | None = None
    mem_peak: int | None = None
    pids_peak: int | None = None
    oom_kill: bool = False
    pids_limited: bool = False

    def log_fields(self) -> dict[str, object]:
        return {
            "cpu_ms": None if self.cpu_ms is None else round(self.cpu_ms, 1),
            "mem_peak": self.mem_peak, "pids_peak": self.pids_peak,
            "oom_kill": 1 if self.oom_kill else None, "pids_limited": 1 if self.pids_limited else None,
        }  # fmt: skip


Write = tuple[int, str, str, bool]  # (index into Shape.parents, file, text, only if the file exists)


@dataclass(frozen=True)
class Shape:
    """What the spawner makes for sessions of one kind, ahead of time: a cgroup of a name of
    its own in each of `parents`, with `limits` written; a process enters by writing "0" into
    `enter` in each; `after` is written right after the spawn (the pids limit back down: it
    was one higher while the spawner was inside); `top`: the parent whose cgroup counts the
    session's processes (the kill's: v1's freezer, v2's one)."""

    parents: tuple[str, ...]
    limits: tuple[Write, ...] = ()
    enter: str = "tasks"
    after: tuple[Write, ...] = ()
    top: int = 0


class Scope:
    """One session's cgroups, named `name` (the spawner chose it) in each hierarchy its keys need."""

    mode: ClassVar[str]
    top_hierarchy: ClassVar[str]

    def __init__(self, root: Root, name: str, limits: Limits, accounting: bool) -> None:
        self.root = root
        self.name = name
        self.limits = limits
        self.accounting = accounting
        self.dirs = {h: os.path.join(path, name) for h, path in _parents(root, limits, accounting).items()}
        self.paths = unique(self.dirs.values())

    @staticmethod
    def of(root: Root, name: str, limits: Limits, accounting: bool) -> Scope:
        kind = V2Scope if root.host.mode == "v2" else V1Scope
        return kind(root, name, limits, accounting)

    @staticmethod
    def shape(root: Root, limits: Limits, accounting: bool) -> Shape:
        """What the spawner makes for a session of these keys (v1 or v2, as the root is)."""
        parents = _parents(root, limits, accounting)
        where = unique(parents.values())
        index = {h: where.index(path) for h, path in parents.items()}
        return (_v2_shape if root.host.mode == "v2" else _v1_shape)(tuple(where), index, limits)

    @property
    def _top(self) -> str:
        return self.dirs[self.top_hierarchy]

    def members(self) -> list[int]:
        return tasks(self._top)

    def populated(self) -> bool:
        raise NotImplementedError

    def freeze(self, frozen: bool) -> None:
        freeze(self._top, self.mode, frozen)

    def is_frozen(self) -> bool:
        raise NotImplementedError

    def kill_all(self) -> bool:
        """SIGKILL to every process below at once, where the cgroup can (v2's cgroup.kill)."""
        return False

    def usage(self) -> Usage:
        raise NotImplementedError

    def now(self) -> tuple[float | None, int | None]:
        """With accounting: the CPU milliseconds so far and the memory in use now, of the
        session's whole tree (what an operator's /sessions shows); (None, None) without."""
        raise NotImplementedError


class V1Scope(Scope):
    """A cgroup per hierarchy the session needs; the freezer's is where its processes are counted."""

    mode = "v1"
    top_hierarchy = "freezer"

    def populated(self) -> bool:
        """Whether any process lives in the session's cgroups (a zombie does not): its own
        cgroup.procs (one read: the usual case), and the cgroups below only if it made some."""
        if read(os.path.join(self._top, "cgroup.procs")).split():
            return True
        return has_cgroups_below(self._top) and bool(self.members())

    def is_frozen(self) -> bool:
        return read(os.path.join(self._top, "freezer.state")).strip() == "FROZEN"

    def usage(self) -> Usage:
        d, counting = self.dirs, self.accounting
        memory, pids = d.get("memory"), d.get("pids")
        nsec = number(read(f"{d['cpuacct']}/cpuacct.usage")) if counting and "cpuacct" in d else None
        return Usage(
            cpu_ms=None if nsec is None else nsec / 1e6,
            mem_peak=number(read(f"{memory}/memory.max_usage_in_bytes")) if counting and memory else None,
            pids_peak=number(read(f"{pids}/pids.peak")) if counting and pids else None,
            oom_kill=bool(field(read(f"{memory}/memory.oom_control"), "oom_kill")) if memory else False,
            pids_limited=bool(field(read(f"{pids}/pids.events"), "max")) if pids else False,
        )

    def now(self) -> tuple[float | None, int | None]:
        d = self.dirs
        if not self.accounting:
            return None, None
        nsec = number(read(f"{d['cpuacct']}/cpuacct.usage")) if "cpuacct" in d else None
        memory = number(read(f"{d['memory']}/memory.usage_in_bytes")) if "memory" in d else None
        return (None if nsec is None else nsec / 1e6), memory


class V2Scope(Scope):
    """One cgroup of the unified tree; the limits' controllers are enabled above it (Root.enable)."""

    mode = "v2"
    top_hierarchy = "unified"

    def populated(self) -> bool:
        return field(read(os.path.join(self._top, "cgroup.events")), "populated") == 1

    def is_frozen(self) -> bool:
        return field(read(os.path.join(self._top, "cgroup.events")), "frozen") == 1

    def kill_all(self) -> bool:
        write(os.path.join(self._top, "cgroup.kill"), "1")
        return True

    def usage(self) -> Usage:
        u, enabled, counting = self._top, self.root.enabled, self.accounting
        usec = field(read(f"{u}/cpu.stat"), "usage_usec") if counting else None
        return Usage(
            cpu_ms=None if usec is None else usec / 1000,
            mem_peak=number(read(f"{u}/memory.peak")) if counting and "memory" in enabled else None,
            pids_peak=number(read(f"{u}/pids.peak")) if counting and "pids" in enabled else None,
            oom_kill=bool(field(read(f"{u}/memory.events"), "oom_kill")) if "memory" in enabled else False,
            pids_limited=bool(field(read(f"{u}/pids.events"), "max")) if "pids" in enabled else False,
        )

    def now(self) -> tuple[float | None, int | None]:
        u = self._top
        if not self.accounting:
            return None, None
        usec = field(read(f"{u}/cpu.stat"), "usage_usec")
        memory = number(read(f"{u}/memory.current")) if "memory" in self.root.enabled else None
        return (None if usec is None else usec / 1000), memory


def _parents(root: Root, limits: Limits, accounting: bool) -> dict[str, str]:
    """The root's directory in each hierarchy a session of these keys needs."""
    if root.host.mode == "v2":
        return {"unified": root.dirs["unified"]}
    wanted = {"freezer"} | limits.controllers("v1") | (V1_COUNTERS if accounting else set())
    return {h: path for h, path in root.dirs.items() if h in wanted}


def _v1_shape(where: tuple[str, ...], index: dict[str, int], limits: Limits) -> Shape:
    quota = str(round(limits.cpu * CPU_PERIOD_US))
    files: list[Write | None] = [
        (index["memory"], "memory.limit_in_bytes", str(limits.memory), False) if limits.memory else None,
        # swap is no way around the limit (the file exists where swap accounting is on)
        (index["memory"], "memory.memsw.limit_in_bytes", str(limits.memory), True) if limits.memory else None,
        (index["pids"], "pids.max", str(limits.pids + 1), False) if limits.pids else None,
        (index["cpu"], "cpu.cfs_period_us", str(CPU_PERIOD_US), False) if limits.cpu else None,
        (index["cpu"], "cpu.cfs_quota_us", quota, False) if limits.cpu else None,
    ]
    after = ((index["pids"], "pids.max", str(limits.pids), False),) if limits.pids else ()
    return Shape(where, tuple(f for f in files if f is not None), "tasks", after, index["freezer"])


def _v2_shape(where: tuple[str, ...], index: dict[str, int], limits: Limits) -> Shape:
    quota = str(round(limits.cpu * CPU_PERIOD_US))
    files: list[Write | None] = [
        (0, "memory.max", str(limits.memory), False) if limits.memory else None,
        (0, "memory.swap.max", "0", True) if limits.memory else None,
        (0, "pids.max", str(limits.pids + 1), False) if limits.pids else None,
        (0, "cpu.max", f"{quota} {CPU_PERIOD_US}", False) if limits.cpu else None,
    ]
    after = ((0, "pids.max", str(limits.pids), False),) if limits.pids else ()
    return Shape(where, tuple(f for f in files if f is not None), "cgroup.procs", after)
