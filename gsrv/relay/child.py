"""A session's child process: its stdio, its start through the spawner, its exit, the stop ladder.

While gsrv runs, the only module that signals a session's processes (the guardian, a process
of its own, does so only once gsrv is gone). Each child leads its own session; the ladder
signals its kill scope: the process group (killpg reaches a shell pipeline's parts) or, with
a cgroup per session, every process in that cgroup, daemonized ones included. The spawner
(gsrv/spawn) starts it and keeps it a zombie until the ladder is done, so no pid or process
group the ladder signals can be a reused one; where the ladder can signal nothing after the
exit (the Spawn's `at_exit`: a process group, or a cgroup the exit left empty) it reaps it then.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Callable
from typing import Protocol

import gevent

from gsrv.config.launch import Launch
from gsrv.contain.root import Root
from gsrv.contain.scope import Limits, Scope, Shape, Usage
from gsrv.errors import SpawnError
from gsrv.relay.ending import ending_of
from gsrv.relay.killscope import CgroupMembers, ProcessGroup
from gsrv.relay.stdio import Stdio
from gsrv.spawn import wire
from gsrv.spawn.client import Spawner
from gsrv.spawn.process import Process

GROUP_POLL_S = 0.02
REAP_TIMEOUT_S = 5.0
ORPHANS_WAIT_S = 1.0  # for gsrv's own reaping of a session's orphaned zombies (a loop's turn, normally)
ORPHANS_POLL_S = 0.002
STARTED_TIMEOUT_S = 30.0  # a spawner that neither answers nor dies: the session ends spawn_failed


class GroupTracker(Protocol):
    def track(self, pgid: int) -> None: ...
    def untrack(self, pgid: int) -> None: ...


class Launcher:
    """What starts a session's child: the spawner, gsrv's cgroup root (None: no cgroups for
    sessions), and the guardian that hears of every process group (None: none)."""

    def __init__(self, spawner: Spawner, root: Root | None = None, tracker: GroupTracker | None = None) -> None:
        self.spawner = spawner
        self.root = root
        self.tracker = tracker
        self._shapes: dict[tuple[Limits, bool], Shape] = {}

    def _shape(self, limits: Limits, accounting: bool) -> Shape:
        """The cgroups the spawner makes for sessions of these keys."""
        shape = self._shapes.get((limits, accounting))
        if shape is None:
            assert self.root is not None
            shape = self._shapes[limits, accounting] = Scope.shape(self.root, limits, accounting)
        return shape

    def spawn(self, launch: Launch, env: dict[str, str], stdio: Stdio) -> Child:
        """Ask the spawner for the launch's argv (no shell; its stages composed at load) in a
        new session, in a cgroup of its own when its kill scope is "cgroup", without waiting:
        Child.started() waits for the answer. A pty child is not made a session leader here:
        the launch's tty stage does it, with the terminal in place. Raises SpawnError (its
        errno says whether fds or memory ran out); stdio is then closed."""
        contain = launch.contain
        limits, accounting = (contain.limits, contain.accounting) if contain is not None else (Limits(), False)
        shape, at_exit = wire.NO_CGROUP, wire.REAP
        try:
            if contain is not None and contain.scope == "cgroup":
                assert self.root is not None, "a cgroup kill scope without gsrv's cgroup root"
                shape = self._shape(limits, accounting)
                read_at_end = accounting or limits.memory or limits.pids  # Scope.usage's counters
                at_exit = wire.REAP_IF_EMPTY if read_at_end else wire.REAP_AND_REMOVE_IF_EMPTY
            process = self.spawner.spawn(launch.argv, launch.executable, env, launch.cwd, launch.umask, stdio.theirs,
                                         setsid=not launch.pty, cgroup=shape, at_exit=at_exit)  # fmt: skip
        except SpawnError:
            stdio.unused()
            raise
        stdio.sent()
        child = Child(process, stdio, (limits, accounting) if shape.parents else None, launch.signal_in_exit, self)
        if launch.pipe_size:
            child._set_pipe_size(launch.pipe_size)
        return child


class Child:
    """One command the spawner was asked for; `started()` waits for its answer, `exited` is set
    at its exit (the spawner holds it as a zombie until `stop` is done)."""

    def __init__(self, process: Process, stdio: Stdio, contained: tuple[Limits, bool] | None, signal_in_exit: bool,
                 launcher: Launcher) -> None:  # fmt: skip
        self.process = process
        self.pid = 0
        self.exited = process.exited
        self._contained = contained  # the limits and accounting of its cgroups, if it has some
        self.kill_scope: ProcessGroup | CgroupMembers = ProcessGroup(0)
        self.usage: Usage | None = None  # the cgroup's accounting, once the ladder is done
        self.placement_failed: list[str] = []  # where the spawner could not go back to
        self._signal_in_exit = signal_in_exit
        self._ended: tuple[int | None, int | None, str | None] | None = None  # _ending's, once exited
        self._launcher = launcher
        self._stdio = stdio
        self.signals_sent: list[str] = []
        self.pipe_size_error: OSError | None = None
        self.pty_master, self.stdin, self.stdout, self.stderr = (
            stdio.pty_master,
            stdio.stdin,
            stdio.stdout,
            stdio.stderr,
        )

    @classmethod
    def moved(cls, process: Process, stdio: Stdio, contained: tuple[Limits, bool] | None, signal_in_exit: bool,
              launcher: Launcher) -> Child:  # fmt: skip
        """A child the previous code started, taken over by an upgrade (gsrv/upgrade): its answer
        came long ago, its kill scope is rebuilt, and the guardian hears of its group again."""
        process.started.set()
        child = cls(process, stdio, contained, signal_in_exit, launcher)
        child.started()
        return child

    def started(self) -> None:
        """Wait for the spawner's answer. Raises SpawnError (the stdio and the cgroup gone)."""
        process = self.process
        if not process.started.wait(STARTED_TIMEOUT_S):
            process.error = SpawnError(f"the spawner did not answer within {STARTED_TIMEOUT_S:g}s")
        if process.error is not None:
            self._stdio.unused()
            self.stdin = self.stdout = self.stderr = self.pty_master = -1
            raise process.error
        self.pid = process.pid
        self.placement_failed = process.stuck
        root, contained = self._launcher.root, self._contained
        if contained is not None and root is not None:
            limits, accounting = contained
            self.kill_scope = CgroupMembers(lambda: Scope.of(root, process.cgroup, limits, accounting), self.pid,
                                            process)  # fmt: skip
        else:
            # A process group has no member list to read, and the leader's zombie would keep
            # it alive to killpg(0): the spawner reaps it at its exit (wire.REAP; its group's
            # id stays taken while a member lives, so the ladder still signals no other group).
            self.kill_scope = ProcessGroup(self.pid)
        if self._launcher.tracker is not None:
            self._launcher.tracker.track(self.pid)

    @property
    def contained(self) -> tuple[Limits, bool] | None:
        """The limits and accounting of its cgroups, if it has some (an upgrade carries them)."""
        return self._contained

    @property
    def status(self) -> int | None:
        return self.process.status

    @property
    def rusage_fields(self) -> dict[str, object]:
        """What the spawner's wait4 counted: the child's CPU and that of what it waited for (no
        daemons). Not ru_maxrss: a child started with vfork (posix_spawn) inherits the spawner's
        high-water mark at its exec, so every child reported the spawner's ~13 MiB."""
        usage = self.process.rusage
        return {} if usage is None else {"ru_cpu_ms": usage[0]}

    def _set_pipe_size(self, size: int) -> None:
        for fd in (self.stdin, self.stdout):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
            except OSError as e:
                self.pipe_size_error = e
                return

    @property
    def exit_code(self) -> int | None:
        return self._ending()[0]

    @property
    def killed_by(self) -> int | None:
        """The signal that ended the child (or, in a sandbox, the command bwrap ran), if one did."""
        return self._ending()[1]

    @property
    def signal_name(self) -> str | None:
        """The signal's name without SIG (TERM, KILL; RTMIN+3 or 42 for a real-time one)."""
        return self._ending()[2]

    def _ending(self) -> tuple[int | None, int | None, str | None]:
        """The exit code, the signal and its name, read once from the status word (it is set once)."""
        if self._ended is None:
            if self.status is None:
                return None, None, None
            self._ended = ending_of(self.status, self._signal_in_exit)
        return self._ended

    def close_stdin(self) -> None:
        """The child reads EOF; on a terminal, closing the master is a hangup (SIGHUP to its session)."""
        if self.pty_master >= 0:
            self._close_pty_master()
        elif self.stdin >= 0:
            os.close(self.stdin)
            self.stdin = -1

    def close_pipes(self) -> None:
        self.close_stdin()
        for name in ("stdout", "stderr"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def _close_pty_master(self) -> None:
        if self.pty_master >= 0:
            os.close(self.pty_master)
            self.pty_master = self.stdin = self.stdout = -1

    def hang_up(self) -> bool:
        """What a terminal's hangup does: SIGHUP to its foreground process group and to its
        session leader, the child (the master stays open, so what the child writes on its way
        out still reaches the client; TIOCSIG on a master sends only INT, QUIT and TSTP)."""
        if self.pty_master < 0 or self.exited.is_set():
            return False
        groups = {self.pid}
        with contextlib.suppress(OSError):
            foreground = os.tcgetpgrp(self.pty_master)  # on the master: the slave's foreground group
            # 0: none (killpg(0) would be gsrv's own); the spawner's: a child before its tty stage
            if foreground > 0 and foreground not in (os.getpgrp(), self._launcher.spawner.pid):
                groups.add(foreground)
        sent = False
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGHUP)
                sent = True
        if sent:
            self.signals_sent.append("HUP")
        return sent

    def group_alive(self) -> bool:
        """Whether anything of the kill scope (the process group, or the session's cgroup) lives."""
        if self.process.alone:  # the spawner found its cgroup empty at its exit, and reaped it
            return False
        if self._contained is None and self.exited.is_set():
            self.process.reaped.wait(REAP_TIMEOUT_S)  # asked for at the exit: its zombie answers killpg(0)
        return self.kill_scope.alive()

    def _signal_group(self, sig: signal.Signals) -> None:
        sent = self.kill_scope.signal(sig)
        if not sent and not self.exited.is_set():
            # A pty child before its tty stage made it a group leader (it is in gsrv's group
            # then): its pid is still its own, not yet reaped, so it cannot name another process.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
                sent = True
        if sent:
            self.signals_sent.append(sig.name.removeprefix("SIG"))

    def _wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.exited.is_set() and not self.group_alive():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.exited.is_set():
                gevent.sleep(min(left, GROUP_POLL_S))  # grandchildren left: poll the group
            else:
                self.exited.wait(left)

    def stop(self, kill_grace: float, on_escalate: Callable[[float], None], signal_first: bool = False) -> None:
        """The ladder: close stdin, TERM the kill scope if anything of it lives, KILL after
        kill_grace; then the cgroup's accounting, and the reap and the cgroup's removal asked
        of the spawner (in a finally: a step that raised still leaves no pipe, no tracked
        group, no cgroup and no zombie). Nothing yields once the pipes are closed: a freed fd
        number must not wake a watcher of the session's (`wait_reaped` waits for the reap).
        `signal_first`: its input was cut short, so TERM goes before stdin closes (the child
        must never take the cut for the end of its input)."""
        try:
            alive = not (self.exited.is_set() and not self.group_alive())
            if signal_first and alive:
                self._signal_group(signal.SIGTERM)
            self.close_stdin()
            if alive:
                if not signal_first:
                    self._signal_group(signal.SIGTERM)
                if not self._wait_group_gone(kill_grace):
                    on_escalate(kill_grace)
                    self._signal_group(signal.SIGKILL)
                    self._wait_group_gone(REAP_TIMEOUT_S)
        finally:
            self.close_pipes()
            if self._launcher.tracker is not None:
                self._launcher.tracker.untrack(self.pid)
            self.usage = self.kill_scope.finish()
            # a child still running is reaped at its exit; its cgroups are removed behind
            self._launcher.spawner.reap(self.process, self.kill_scope.cgroups)

    def wait_reaped(self) -> None:
        """Until the spawner reaped it (its rusage is then known), if it has exited; then, for a
        session cgroup, until gsrv reaped the zombies of its group's orphans too."""
        if self.exited.is_set():
            self.process.reaped.wait(REAP_TIMEOUT_S)
            if isinstance(self.kill_scope, CgroupMembers) and self.process.reaped.is_set():
                self._orphans_reaped(self.kill_scope.group)

    @staticmethod
    def _orphans_reaped(group: ProcessGroup) -> None:
        """A session's orphans left its cgroup only by exiting (it was empty when the ladder
        ended), but their zombies are gsrv's, its subreaper's, reaped at the loop's next turn,
        and killpg still finds the group until then. Wait for that, bounded, signalling nothing
        (once the leader is reaped the group's id may be another's after its last member)."""
        deadline = time.monotonic() + ORPHANS_WAIT_S
        while group.alive() and time.monotonic() < deadline:
            gevent.sleep(ORPHANS_POLL_S)
