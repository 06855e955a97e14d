"""A session child's kill scope, what its stop ladder signals and asks whether anything lives:
its process group (`ProcessGroup`, killpg), or with a cgroup per session every process in that
cgroup and the group too (`CgroupMembers`, through contain/scope.py). One interface: `alive`,
`signal`, `now`, `finish`, `cgroups`. Only relay/child.py's ladder uses them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

import gevent

from gsrv.contain.scope import Scope, Usage
from gsrv.spawn import wire
from gsrv.spawn.process import Process

FREEZE_WAIT_S = 1.0  # a task in uninterruptible sleep may delay the freeze: signal after this anyway
FREEZE_POLL_S = 0.002


class ProcessGroup:
    """kill_scope = "group": the child's process group (it leads a session of its own)."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid

    def alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def signal(self, sig: signal.Signals) -> bool:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            return False
        return True

    def now(self) -> tuple[float | None, int | None]:
        """No cgroup to read: the caller reads the child's own figures."""
        return None, None

    def finish(self) -> Usage | None:
        return None

    cgroups: tuple[str, ...] = ()  # none of its own


class CgroupMembers:
    """kill_scope = "cgroup": every process in the session's cgroup, and its process group too
    (safe to signal: the leader's zombie keeps the group's id taken). A signal other than v2's cgroup.kill
    reaches them frozen (freeze, signal each, thaw), so a fork cannot slip by."""

    def __init__(self, scope_of: Callable[[], Scope], pgid: int, process: Process) -> None:
        self._scope_of = scope_of
        self._scope: Scope | None = None
        self.group = ProcessGroup(pgid)
        self.process = process

    @property
    def scope(self) -> Scope:
        """Its cgroups' paths, made when first needed: a session whose cgroup its exit left
        empty and the spawner removed (wire.REAP_AND_REMOVE_IF_EMPTY) never needs them."""
        if self._scope is None:
            self._scope = self._scope_of()
        return self._scope

    @property
    def removed(self) -> bool:
        """The spawner found the cgroup empty at the exit and removes it: nothing to read or ask."""
        return self.process.alone and self.process.at_exit == wire.REAP_AND_REMOVE_IF_EMPTY

    def alive(self) -> bool:
        """Whether a process of the session lives (a zombie does not: the leader's is held by
        the spawner until the ladder is done, and orphans' are gsrv's, its subreaper's, to reap)."""
        try:
            return self.scope.populated()
        except OSError:  # unreadable (out of fds): they may live
            return True

    def signal(self, sig: signal.Signals) -> bool:
        """Each member once. KILL also goes to the process group (a second KILL is harmless,
        and it reaches a member that moved itself out of the cgroup); TERM goes to the group
        only when the cgroup has no member left, so no process handles it twice."""
        scope = self.scope
        if sig == signal.SIGKILL:
            in_group = self.group.signal(sig)
            with contextlib.suppress(OSError):
                if scope.kill_all():
                    return True
        frozen = self._freeze(True)
        try:
            try:
                members = scope.members()
            except OSError:
                members = []
            sent = False
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                    sent = True
            if sig != signal.SIGKILL:
                in_group = self.group.signal(sig) if not members else False
        finally:
            if frozen:
                self._freeze(False)
        return sent or in_group

    def _freeze(self, frozen: bool) -> bool:
        """Freeze (and wait, bounded, until the kernel says so) or thaw; False if the cgroup
        refused: then the signals go out unfrozen, and a fork that slips by meets the next step."""
        try:
            self.scope.freeze(frozen)
            deadline = time.monotonic() + FREEZE_WAIT_S
            while frozen and not self.scope.is_frozen() and time.monotonic() < deadline:
                gevent.sleep(FREEZE_POLL_S)
        except OSError:
            return False
        return True

    def now(self) -> tuple[float | None, int | None]:
        """The session's CPU milliseconds and memory now, from its cgroup (with accounting)."""
        try:
            return self.scope.now()
        except OSError:
            return None, None

    def finish(self) -> Usage | None:
        """The accounting (the ladder left the cgroups empty; the spawner removes them behind)."""
        if self.removed:
            return Usage()  # no counter asked for (REAP_AND_REMOVE_IF_EMPTY: no accounting, no limit)
        try:
            return self.scope.usage()
        except OSError:
            return None

    @property
    def cgroups(self) -> tuple[str, ...]:
        """What the spawner removes once gsrv's Reap comes (none: it removes them itself)."""
        return () if self.removed else tuple(self.scope.paths)
