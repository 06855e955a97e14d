"""gsrv's cgroup subtree (`Root`: gsrv-<pid> under the parent `host` found, per hierarchy) and
one session's cgroups in it (`Scope`): made with their limits before the spawn, read for the
accounting, removed after the reap. Plain file operations: nothing here waits or signals.

gsrv writes inside its root only, with two exceptions that say where a process lives: the
spawner (gsrv/spawn) goes back after each spawn to the cgroups gsrv came from (v1) or to a leaf
beside the root (v2), and on v2 with controllers to enable gsrv moves itself into that leaf (a
cgroup that holds processes cannot enable controllers for its children) and enables them in
its parent.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from gsrv.contain.host import NEEDS, V2_CORE, Host

V2_SELF = "gsrv-{pid}.self"  # v2: the spawner's leaf, where gsrv (and its guardian) move if they must
CPU_PERIOD_US = 100_000


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
    """What a session's cgroup counted; None where this host has no such counter."""

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


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class Unreadable(OSError):
    """A cgroup file that exists but could not be read (EMFILE, ENOMEM): callers that decide
    whether processes live must take it as "they may"."""


def _read(path: str) -> str:
    """A cgroup file's text; "" if it is gone (a removed cgroup); raises Unreadable otherwise.
    (os.open and one read: cgroup files are small, and this runs several times a session.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise Unreadable(e.errno, f"{path}: {e.strerror}") from None
    try:
        return os.read(fd, 65536).decode("ascii", "replace")
    except OSError as e:
        raise Unreadable(e.errno, f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _field(text: str, name: str) -> int | None:
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return None


def _number(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def unique(paths: Iterable[str]) -> list[str]:
    """Each directory once, in order: co-mounted v1 controllers (cpu,cpuacct) share one."""
    return list(dict.fromkeys(paths))


def remove_tree(top: str) -> list[str]:
    """rmdir a cgroup and every cgroup below it, deepest first; the ones left (busy) are returned."""
    try:
        os.rmdir(top)  # a session's cgroup has none below it, unless its processes made some
        return []
    except FileNotFoundError:
        return []
    except OSError:
        pass
    left = []
    for path, _dirs, _files in os.walk(top, topdown=False):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            left.append(path)
    return left


def _has_cgroups_below(top: str) -> bool:
    try:
        with os.scandir(top) as entries:
            return any(entry.is_dir(follow_symlinks=False) for entry in entries)
    except FileNotFoundError:
        return False


def freeze(top: str, mode: str, frozen: bool) -> None:
    """Freeze or thaw a cgroup and every cgroup below it (both freezers are hierarchical);
    freezing is asynchronous: Scope.is_frozen says when it is done."""
    if mode == "v2":
        _write(os.path.join(top, "cgroup.freeze"), "1" if frozen else "0")
    else:
        _write(os.path.join(top, "freezer.state"), "FROZEN" if frozen else "THAWED")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tasks(top: str) -> list[int]:
    """Every process in a cgroup and below it (gsrv itself left out)."""
    found: list[int] = []
    for path, _dirs, _files in os.walk(top):
        found.extend(int(n) for n in _read(os.path.join(path, "cgroup.procs")).split() if n.isdigit())
    own = os.getpid()
    return [pid for pid in found if pid != own]


STALE = re.compile(r"gsrv-(\d+)(\.self)?")


class Root:
    """gsrv's own cgroups: <parent>/gsrv-<pid> per hierarchy, made at start, removed at stop."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.dirs = {name: os.path.join(parent, f"gsrv-{os.getpid()}") for name, parent in host.parents.items()}
        self.enabled: set[str] = set()  # v2: the controllers enabled for sessions
        self.guardian_pid = 0
        self.leaf = os.path.join(host.parents.get("unified", ""), V2_SELF.format(pid=os.getpid()))

    @property
    def paths(self) -> list[str]:
        return unique(self.dirs.values())

    def create(self, guardian_pid: int = 0) -> list[str]:
        """Make the root; returns the cgroups of gsrv processes that are gone, removed first
        (a gsrv and its guardian both killed leave theirs)."""
        self.guardian_pid = guardian_pid
        swept = self._sweep()
        for path in self.paths:
            os.makedirs(path, exist_ok=True)
        if self.host.mode == "v2":
            os.makedirs(self.leaf, exist_ok=True)
        return swept

    @property
    def spawner_homes(self) -> tuple[str, ...]:
        """Where the spawner lives between spawns (the files it writes "0" into to go back):
        v1, the cgroups gsrv came from, per hierarchy it enters; v2, the leaf beside the root
        (a cgroup whose children have controllers cannot take a process back: EBUSY)."""
        if self.host.mode == "v2":
            return (os.path.join(self.leaf, "cgroup.procs"),)
        homes = (os.path.join(self.host.homes.get(name, parent), "tasks") for name, parent in self.host.parents.items())
        return tuple(unique(homes))

    def _sweep(self) -> list[str]:
        swept = []
        for parent in unique(self.host.parents.values()):
            for entry in sorted(os.listdir(parent)):
                found = STALE.fullmatch(entry)
                if found and not _alive(int(found.group(1))) and not remove_tree(os.path.join(parent, entry)):
                    swept.append(os.path.join(parent, entry))
        return swept

    def enable(self, controllers: set[str]) -> None:
        """v2: the controllers sessions need, enabled from the parent down to the root. Raises
        OSError with a message that says what to do."""
        wanted = controllers - self.enabled - {V2_CORE}
        if self.host.mode != "v2" or not wanted:
            return
        parent, root = self.host.parents["unified"], self.dirs["unified"]
        line = " ".join(f"+{c}" for c in sorted(wanted))
        try:
            _write(os.path.join(parent, "cgroup.subtree_control"), line)
        except OSError as e:
            if e.errno != errno.EBUSY or not self.host.own:
                raise OSError(e.errno, f"cannot enable {line} in {parent}: {e.strerror}") from None
            self._leave_parent(parent)
            _write(os.path.join(parent, "cgroup.subtree_control"), line)
        _write(os.path.join(root, "cgroup.subtree_control"), line)
        self.enabled |= wanted

    def _leave_parent(self, parent: str) -> None:
        """A cgroup with processes cannot enable controllers for its children: gsrv and its
        guardian move into the leaf beside the root where the spawner lives, if nothing else
        is there. The leaf stays while they live (a stale one is swept at the next start)."""
        ours = {str(os.getpid()), str(self.guardian_pid)}
        others = [pid for pid in _read(os.path.join(parent, "cgroup.procs")).split() if pid not in ours]
        if others:
            raise OSError(errno.EBUSY, f"{parent} also holds processes {' '.join(others[:5])}: give gsrv a cgroup "
                          "of its own (systemd: Delegate=yes)")  # fmt: skip
        os.makedirs(self.leaf, exist_ok=True)
        for pid in (os.getpid(), self.guardian_pid):
            if pid:
                _write(os.path.join(self.leaf, "cgroup.procs"), str(pid))

    def remove(self) -> list[str]:
        """At a clean stop, every session reaped: the cgroups left are returned (busy)."""
        left = [left for path in self.paths for left in remove_tree(path)]
        if self.host.mode == "v2":
            remove_tree(self.leaf)  # busy while gsrv itself lives there: swept at the next start
        return left


class Scope:
    """One session's cgroups: `dirs` per hierarchy (v1) or the one of the unified tree (v2)."""

    def __init__(self, root: Root, name: str, limits: Limits) -> None:
        self.mode = root.host.mode
        self.root = root
        wanted = (
            {"freezer", "pids", "cpuacct", "memory"} | limits.controllers("v1") if self.mode == "v1" else {"unified"}
        )
        self.dirs = {h: os.path.join(path, name) for h, path in root.dirs.items() if h in wanted}
        self.paths = unique(self.dirs.values())
        self.limits = limits

    @classmethod
    def create(cls, root: Root, name: str, limits: Limits) -> Scope:
        """Make the session's cgroups and write its limits; raises OSError (nothing left behind)."""
        scope = cls(root, name, limits)
        try:
            for path in scope.paths:
                os.mkdir(path)
            for path, text in scope._limit_files():
                _write(path, text)
        except OSError:
            scope.remove()
            raise
        return scope

    def _limit_files(self) -> list[tuple[str, str]]:
        limits, d = self.limits, self.dirs
        quota = str(round(limits.cpu * CPU_PERIOD_US))
        # The spawner counts in pids.current while it is there: one more for the spawn, lowered
        # to the limit before it leaves (placement()).
        if self.mode == "v2":
            u = d["unified"]
            swap = f"{u}/memory.swap.max"
            files = [(f"{u}/memory.max", str(limits.memory)) if limits.memory else None,
                     (swap, "0") if limits.memory and os.path.exists(swap) else None,
                     (f"{u}/pids.max", str(limits.pids + 1)) if limits.pids else None,
                     (f"{u}/cpu.max", f"{quota} {CPU_PERIOD_US}") if limits.cpu else None]  # fmt: skip
        else:
            files = [(f"{d['memory']}/memory.limit_in_bytes", str(limits.memory)) if limits.memory else None,
                     (f"{d['pids']}/pids.max", str(limits.pids + 1)) if limits.pids else None,
                     (f"{d['cpu']}/cpu.cfs_period_us", str(CPU_PERIOD_US)) if limits.cpu else None,
                     (f"{d['cpu']}/cpu.cfs_quota_us", quota) if limits.cpu else None]  # fmt: skip
        memsw = f"{d.get('memory')}/memory.memsw.limit_in_bytes"
        if self.mode == "v1" and limits.memory and os.path.exists(memsw):
            files.insert(1, (memsw, str(limits.memory)))  # swap is no way around the limit
        return [f for f in files if f is not None]

    # -- placement: the spawner enters, spawns, goes back ---------------------------------

    def placement(self) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
        """The files the spawner writes "0" into before the spawn (it then counts in the
        session's pids, hence the limit set one higher), and the writes due right after it
        (the pids limit back to its value, before the spawner leaves)."""
        if self.mode == "v2":
            enter: tuple[str, ...] = (os.path.join(self.dirs["unified"], "cgroup.procs"),)
            pids = os.path.join(self.dirs["unified"], "pids.max")
        else:
            enter = tuple(os.path.join(path, "tasks") for path in self.paths)
            pids = os.path.join(self.dirs.get("pids", ""), "pids.max")
        return enter, ((pids, str(self.limits.pids)),) if self.limits.pids else ()

    # -- the kill's parts (child.py decides when) --------------------------------------------

    @property
    def _top(self) -> str:
        return self.dirs["freezer" if self.mode == "v1" else "unified"]

    def members(self) -> list[int]:
        return tasks(self._top)

    def populated(self) -> bool:
        """Whether any process lives in the session's cgroups (a zombie does not). v2:
        cgroup.events. v1: its own cgroup.procs (one read: the usual case), and the cgroups
        below it only if the session made some."""
        if self.mode == "v2":
            return _field(_read(os.path.join(self._top, "cgroup.events")), "populated") == 1
        if _read(os.path.join(self._top, "cgroup.procs")).split():
            return True
        return _has_cgroups_below(self._top) and bool(self.members())

    def freeze(self, frozen: bool) -> None:
        freeze(self._top, self.mode, frozen)

    def is_frozen(self) -> bool:
        if self.mode == "v2":
            return _field(_read(os.path.join(self._top, "cgroup.events")), "frozen") == 1
        return _read(os.path.join(self._top, "freezer.state")).strip() == "FROZEN"

    def kill_all(self) -> bool:
        """v2: SIGKILL to every process below (cgroup.kill); False on v1, which has none."""
        if self.mode != "v2":
            return False
        _write(os.path.join(self._top, "cgroup.kill"), "1")
        return True

    # -- the end ---------------------------------------------------------------------------

    def usage(self) -> Usage:
        d = self.dirs
        if self.mode == "v2":
            u = d["unified"]
            enabled = self.root.enabled
            usec = _field(_read(f"{u}/cpu.stat"), "usage_usec")
            return Usage(
                cpu_ms=None if usec is None else usec / 1000,
                mem_peak=_number(_read(f"{u}/memory.peak")) if "memory" in enabled else None,
                pids_peak=_number(_read(f"{u}/pids.peak")) if "pids" in enabled else None,
                oom_kill=bool(_field(_read(f"{u}/memory.events"), "oom_kill")),
                pids_limited=bool(_field(_read(f"{u}/pids.events"), "max")),
            )
        nsec = _number(_read(f"{d['cpuacct']}/cpuacct.usage")) if "cpuacct" in d else None
        return Usage(
            cpu_ms=None if nsec is None else nsec / 1e6,
            mem_peak=_number(_read(f"{d['memory']}/memory.max_usage_in_bytes")) if "memory" in d else None,
            pids_peak=_number(_read(f"{d['pids']}/pids.peak")) if "pids" in d else None,
            oom_kill=bool(_field(_read(f"{d['memory']}/memory.oom_control"), "oom_kill")) if "memory" in d else False,
            pids_limited=bool(_field(_read(f"{d['pids']}/pids.events"), "max")) if "pids" in d else False,
        )

    def remove(self) -> bool:
        """rmdir the session's cgroups (empty once the ladder is done); False if one is busy."""
        return not [left for path in self.paths for left in remove_tree(path)]
