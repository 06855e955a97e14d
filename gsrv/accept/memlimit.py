"""Where this process's memory cgroup is, and how much memory its limits leave (v1 and v2).

Headroom at each level up the hierarchy is its limit less its usage, where usage leaves
out inactive page cache (streaming files through page cache is not pressure).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gsrv.contain.host import below, memberships, mounts

NO_LIMIT_V1 = 2**60  # v1 says "no limit" with LONG_MAX rounded down to a page


@dataclass(frozen=True)
class Level:
    limit: int | None
    usage: int  # without inactive page cache


_open_files: dict[str, int] = {}


def _read(path: str) -> str | None:
    """A small /proc or cgroup file, from a descriptor kept open: pread at offset 0 makes the
    kernel render it anew, at a fraction of the cost of open, read and close."""
    fd = _open_files.get(path)
    try:
        if fd is None:
            fd = _open_files[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(fd, 65536, 0).decode("ascii", "replace").strip()
    except OSError:
        return None


def _stat(path: str, key: str) -> int:
    text = _read(path) or ""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.isdigit():
            return int(value)
    return 0


_FILES = {
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    2: ("memory.max", "memory.current", "inactive_file"),
}


def read_level(version: int, directory: str) -> Level | None:
    """One cgroup directory's limit and usage; None where it has no memory files. Usage is
    read only under a limit: a level without one bounds nothing."""
    limit_file, usage_file, cache_key = _FILES[version]
    limit_text = _read(f"{directory}/{limit_file}")
    if limit_text is None:
        return None
    limit = int(limit_text) if limit_text.isdigit() else None  # v2: "max"
    if limit is not None and version == 1 and limit >= NO_LIMIT_V1:
        limit = None
    if limit is None:
        return Level(None, 0)
    usage_text = _read(f"{directory}/{usage_file}")
    if usage_text is None or not usage_text.isdigit():
        return None
    return Level(limit, max(0, int(usage_text) - _stat(f"{directory}/memory.stat", cache_key)))


@dataclass(frozen=True)
class Cgroup:
    """The memory cgroup's directories, from this process's own up to the mount's root."""

    version: int
    dirs: tuple[str, ...]

    def levels(self) -> list[Level]:
        return [level for d in self.dirs if (level := read_level(self.version, d)) is not None]

    def headroom(self) -> tuple[int | None, int | None]:
        """(memory left under the tightest limit, that limit); (None, None) without limits."""
        limited = [lv for lv in self.levels() if lv.limit is not None]
        if not limited:
            return None, None
        room = min(max(0, lv.limit - lv.usage) for lv in limited if lv.limit is not None)
        return room, min(lv.limit for lv in limited if lv.limit is not None)


def discover(proc: str = "/proc/self") -> Cgroup | None:
    """This process's memory cgroup: v1's memory controller if mounted, else the v2 tree (the
    mounts and memberships as gsrv/contain/host.py reads them, escapes and all)."""
    found = mounts(_read(f"{proc}/mountinfo") or "")
    own = memberships(_read(f"{proc}/cgroup") or "")
    v1 = "memory" in own and any(m.version == 1 and "memory" in m.controllers for m in found)
    for mount in found:
        if (mount.version == 1 and "memory" not in mount.controllers) or (mount.version == 2 and v1):
            continue  # hybrid: the memory controller lives on v1
        leaf = below(mount, own.get("memory" if mount.version == 1 else "unified", "/"))
        if leaf is None:
            continue
        point = os.path.normpath(mount.point)
        dirs = [leaf]
        while dirs[-1] != point and dirs[-1].startswith(point + "/"):
            dirs.append(os.path.dirname(dirs[-1]))
        return Cgroup(mount.version, tuple(dirs))
    return None
