"""Reading and writing cgroup files, and the few tree operations on them (remove, freeze, list
the processes): plain file operations, nothing here waits or signals. gsrv, its spawner (which
makes and removes the session cgroups) and its guardian all use these.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class Unreadable(OSError):
    """A cgroup file that exists but could not be read (EMFILE, ENOMEM): callers that decide
    whether processes live must take it as "they may"."""


def read(path: str) -> str:
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


def field(text: str, name: str) -> int | None:
    """A `name value` line's value (cgroup.events, cpu.stat, memory.events, ...)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return None


def number(text: str) -> int | None:
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


def has_cgroups_below(top: str) -> bool:
    """One stat: a cgroup directory's link count is 2 plus its child cgroups (kernfs keeps it)."""
    try:
        return os.stat(top).st_nlink > 2
    except FileNotFoundError:
        return False


def freeze(top: str, mode: str, frozen: bool) -> None:
    """Freeze or thaw a cgroup and every cgroup below it (both freezers are hierarchical);
    freezing is asynchronous: Scope.is_frozen says when it is done."""
    if mode == "v2":
        write(os.path.join(top, "cgroup.freeze"), "1" if frozen else "0")
    else:
        write(os.path.join(top, "freezer.state"), "FROZEN" if frozen else "THAWED")


def tasks(top: str) -> list[int]:
    """Every process in a cgroup and below it (the calling process left out)."""
    found: list[int] = []
    for path, _dirs, _files in os.walk(top):
        found.extend(int(n) for n in read(os.path.join(path, "cgroup.procs")).split() if n.isdigit())
    own = os.getpid()
    return [pid for pid in found if pid != own]
