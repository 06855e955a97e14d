"""gsrv's cgroup subtree: gsrv-<pid> under the parent `host` found, per hierarchy; made at
start, removed at a clean stop, swept at the next start when a gsrv was killed.

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

from gsrv.contain.cgfiles import read, remove_tree, unique, write
from gsrv.contain.host import V2_CORE, Host

V2_SELF = "gsrv-{pid}.self"  # v2: the spawner's leaf, where gsrv (and its guardian) move if they must
STALE = re.compile(r"gsrv-(\d+)(\.self)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
            write(os.path.join(parent, "cgroup.subtree_control"), line)
        except OSError as e:
            if e.errno != errno.EBUSY or not self.host.own:
                raise OSError(e.errno, f"cannot enable {line} in {parent}: {e.strerror}") from None
            self._leave_parent(parent)
            write(os.path.join(parent, "cgroup.subtree_control"), line)
        write(os.path.join(root, "cgroup.subtree_control"), line)
        self.enabled |= wanted

    def _leave_parent(self, parent: str) -> None:
        """A cgroup with processes cannot enable controllers for its children: gsrv and its
        guardian move into the leaf beside the root where the spawner lives, if nothing else
        is there. The leaf stays while they live (a stale one is swept at the next start)."""
        ours = {str(os.getpid()), str(self.guardian_pid)}
        others = [pid for pid in read(os.path.join(parent, "cgroup.procs")).split() if pid not in ours]
        if others:
            raise OSError(errno.EBUSY, f"{parent} also holds processes {' '.join(others[:5])}: give gsrv a cgroup "
                          "of its own (systemd: Delegate=yes)")  # fmt: skip
        os.makedirs(self.leaf, exist_ok=True)
        for pid in (os.getpid(), self.guardian_pid):
            if pid:
                write(os.path.join(self.leaf, "cgroup.procs"), str(pid))

    def remove(self) -> list[str]:
        """At a clean stop, every session reaped: the cgroups left are returned (busy)."""
        left = [left for path in self.paths for left in remove_tree(path)]
        if self.host.mode == "v2":
            remove_tree(self.leaf)  # busy while gsrv itself lives there: swept at the next start
        return left
