"""A session's child process: spawn without a shell, watch its exit, and the stop ladder.

While gsrv runs, the only module that signals a session's processes (the guardian, a process
of its own, does so only once gsrv is gone). Each child leads its own session; the ladder
signals its kill scope: the process group (killpg reaches a shell pipeline's parts) or, with
a cgroup per session, every process in that cgroup, daemonized ones included.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Protocol

import gevent
from gevent import get_hub
from gevent.event import Event

from gsrv.config.contain import CGROUP_SLOT, Containment
from gsrv.config.launch import Launch
from gsrv.contain.scope import Root, Scope, Usage
from gsrv.errors import SpawnError

GROUP_POLL_S = 0.02
REAP_TIMEOUT_S = 5.0
FREEZE_WAIT_S = 1.0  # a task in uninterruptible sleep may delay the freeze: signal after this anyway
FREEZE_POLL_S = 0.002

_hub_ready: set[int] = set()


class GroupTracker(Protocol):
    def track(self, pgid: int) -> None: ...
    def untrack(self, pgid: int) -> None: ...


_tracker: GroupTracker | None = None


def track_groups(tracker: GroupTracker | None) -> None:
    """Report every child's process group to tracker (the guardian), from now on."""
    global _tracker
    _tracker = tracker


_root: Root | None = None


def contain_in(root: Root | None) -> None:
    """Sessions whose kill scope is "cgroup" get their cgroups below root, from now on."""
    global _root
    _root = root


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

    def finish(self) -> Usage | None:
        return None

    left = False  # no cgroups of its own to leave behind


class CgroupMembers:
    """kill_scope = "cgroup": every process in the session's cgroup, and its process group too
    (a process leaves the cgroup's list when it exits, the group's only once reaped: the ladder
    still waits for the zombies of orphans as it did). A signal other than v2's cgroup.kill
    reaches them frozen (freeze, signal each, thaw), so a fork cannot slip by."""

    def __init__(self, scope: Scope, pgid: int) -> None:
        self.scope = scope
        self.group = ProcessGroup(pgid)
        self.left = False  # a cgroup of the session could not be removed

    def alive(self) -> bool:
        try:
            populated = self.scope.populated()
        except OSError:  # unreadable (out of fds): they may live
            populated = True
        return populated or self.group.alive()

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

    def finish(self) -> Usage | None:
        """The accounting, then the cgroups removed (the ladder left them empty)."""
        try:
            usage: Usage | None = self.scope.usage()
        except OSError:
            usage = None
        self.left = not self.scope.remove()
        return usage


class Child:
    """One running command with non-blocking pipes; `exited` is set once it is reaped."""

    def __init__(self, proc: subprocess.Popen[bytes], scope: Scope | None, signal_in_exit: bool) -> None:
        self.pid = proc.pid
        self._proc = proc
        self.exited = Event()
        self.status: int | None = None
        self.kill_scope: ProcessGroup | CgroupMembers = (
            ProcessGroup(proc.pid) if scope is None else CgroupMembers(scope, proc.pid)
        )
        self.usage: Usage | None = None  # the cgroup's accounting, once the ladder is done
        self.placement_failed: list[str] = []  # v1: where gsrv's spawning thread could not go back to
        self._signal_in_exit = signal_in_exit
        self.signals_sent: list[str] = []
        self.pipe_size_error: OSError | None = None
        self.terminal = -1  # the master side of its pty (pty = true): its stdin and stdout
        self.stdin = proc.stdin.fileno() if proc.stdin else -1
        self.stdout = proc.stdout.fileno() if proc.stdout else -1
        self.stderr = proc.stderr.fileno() if proc.stderr else -1
        for fd in (self.stdin, self.stdout, self.stderr):
            if fd >= 0:
                os.set_blocking(fd, False)

    @classmethod
    def spawn(
        cls, launch: Launch, env: dict[str, str], cwd: str | None, stderr: str, pipe_size: int = 0,
        connection: int = -1, contain: Containment | None = None, name: str = "", pty: bool = False,
    ) -> Child:  # fmt: skip
        """Start the launch's argv (no shell; its stages composed at load) in a new session,
        and in a cgroup of its own (named `name`) when its kill scope is "cgroup".
        Raises SpawnError with a readable reason; its errno says whether fds or memory ran out.

        Its stdin and stdout are pipes, or with `connection` (a socket's fd: socket handoff)
        that socket, made blocking as inetd programs expect (gsrv does no I/O on it until the
        child's group is gone), or with `pty` the slave side of a new pseudo-terminal (stderr
        too with stderr "stdout"), whose master gsrv keeps (`terminal`): the launch's tty stage
        makes the child a session leader with it as its controlling terminal, so the child is
        spawned in gsrv's process group (setsid would fork a group leader) and leaves it at once.
        pipe_size (if not 0) sets the pipes' capacity; when the kernel refuses (EPERM: the
        user's pipe budget is spent), they keep the default and `pipe_size_error` says why."""
        hub = get_hub()
        if id(hub.loop) not in _hub_ready:
            hub.loop.install_sigchld()
            _hub_ready.add(id(hub.loop))
        err = {"log": subprocess.PIPE, "websocket": subprocess.PIPE, "discard": subprocess.DEVNULL,
               "stdout": subprocess.STDOUT}[stderr]  # fmt: skip
        argv, executable, umask = launch.argv, launch.executable, launch.umask
        stdio = subprocess.PIPE if connection < 0 else connection
        scope = None
        master = slave = -1
        try:
            if pty:
                master, slave = os.openpty()
                stdio = slave
                err = slave if stderr == "stdout" else err
            if contain is not None and contain.scope == "cgroup":
                assert _root is not None, "a cgroup kill scope without gsrv's cgroup root"
                scope = Scope.create(_root, name, contain.limits)
                argv = launch.argv_for(scope.entry, CGROUP_SLOT) if scope.mode == "v2" else argv
            if connection >= 0:
                os.set_blocking(connection, True)
            proc, stuck = _popen(argv, executable, stdio, err, env, cwd, umask, scope, new_session=not pty)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            if master >= 0:
                os.close(master)
            if connection >= 0:
                os.set_blocking(connection, False)  # not started: the socket is gsrv's again
            if scope is not None:
                scope.remove()
            if isinstance(e, OSError):
                what = e.filename if e.filename is not None else argv[0]
                raise SpawnError(f"{e.strerror or e}: {what}", e.errno) from None
            raise SpawnError(str(e)) from None
        finally:
            if slave >= 0:
                os.close(slave)  # the child's now; gsrv holding it would hide the terminal's end (EIO)
        child = cls(proc, scope, launch.signal_in_exit)
        if master >= 0:
            os.set_blocking(master, False)
            child.terminal = child.stdin = child.stdout = master
        child.placement_failed = stuck
        watcher = hub.loop.child(proc.pid)
        watcher.start(child._on_exit, watcher)
        if _tracker is not None:
            _tracker.track(proc.pid)
        if pipe_size:
            child._set_pipe_size(pipe_size)
        return child

    def _set_pipe_size(self, size: int) -> None:
        for fd in (self.stdin, self.stdout):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
            except OSError as e:
                self.pipe_size_error = e
                return

    def _on_exit(self, watcher: object) -> None:
        self.status = watcher.rstatus  # type: ignore[attr-defined]
        watcher.stop()  # type: ignore[attr-defined]
        # Tell the Popen object the child is reaped, so that neither its __del__ nor
        # subprocess's cleanup ever calls waitpid on a pid the kernel may have reused.
        self._proc.returncode = os.waitstatus_to_exitcode(self.status)
        self.exited.set()

    @property
    def exit_code(self) -> int | None:
        if self.status is None or not os.WIFEXITED(self.status) or self._exit_was_signal():
            return None
        return os.WEXITSTATUS(self.status)

    @property
    def killed_by(self) -> int | None:
        """The signal that ended the child (or, in a sandbox, the command bwrap ran), if one did."""
        if self.status is None:
            return None
        if self._exit_was_signal():
            return os.WEXITSTATUS(self.status) - 128
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    @property
    def signal_name(self) -> str | None:
        """The signal's name without SIG (TERM, KILL; RTMIN+3 or 42 for a real-time one)."""
        number = self.killed_by
        if number is None:
            return None
        try:
            return signal.Signals(number).name.removeprefix("SIG")
        except ValueError:  # the real-time signals between RTMIN and RTMAX have no member
            return str(number)

    def _exit_was_signal(self) -> bool:
        """bwrap's exit 128+N for a command killed by signal N (N a signal this host has)."""
        assert self.status is not None
        if not (self._signal_in_exit and os.WIFEXITED(self.status)):
            return False
        return os.WEXITSTATUS(self.status) - 128 in signal.valid_signals()

    def close_stdin(self) -> None:
        """The child reads EOF; on a terminal, closing the master is a hangup (SIGHUP to its session)."""
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()
        self._close_terminal()

    def close_pipes(self) -> None:
        for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
        self._close_terminal()

    def _close_terminal(self) -> None:
        if self.terminal >= 0:
            os.close(self.terminal)
            self.terminal = self.stdin = self.stdout = -1

    def hang_up(self) -> bool:
        """What a terminal's hangup does: SIGHUP to its foreground process group and to its
        session leader, the child (the master stays open, so what the child writes on its way
        out still reaches the client; TIOCSIG on a master sends only INT, QUIT and TSTP)."""
        if self.terminal < 0 or self.exited.is_set():
            return False
        groups = {self.pid}
        with contextlib.suppress(OSError):
            foreground = os.tcgetpgrp(self.terminal)  # on the master: the slave's foreground group
            if foreground > 0 and foreground != os.getpgrp():  # 0: none (killpg(0) would be gsrv's own)
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

    def stop(self, kill_grace: float, on_escalate: Callable[[float], None]) -> None:
        """The ladder: close stdin, TERM the kill scope if anything of it lives, KILL after
        kill_grace, reap; then the cgroup's accounting and its removal (in a finally: a
        step that raised still leaves no pipe, no tracked group and no cgroup it can remove)."""
        try:
            self.close_stdin()
            if not (self.exited.is_set() and not self.group_alive()):
                self._signal_group(signal.SIGTERM)
                if not self._wait_group_gone(kill_grace):
                    on_escalate(kill_grace)
                    self._signal_group(signal.SIGKILL)
                    self._wait_group_gone(REAP_TIMEOUT_S)
        finally:
            self.close_pipes()
            if _tracker is not None:
                _tracker.untrack(self.pid)
            self.usage = self.kill_scope.finish()


def _popen(
    argv: tuple[str, ...], executable: str, stdio: int, err: int, env: dict[str, str], cwd: str | None, umask: int,
    scope: Scope | None, new_session: bool = True,
) -> tuple[subprocess.Popen[bytes], list[str]]:  # fmt: skip
    """The stdlib constructor forks with vfork in C (well under a millisecond); gevent's Popen
    forks in Python and blocks the loop for milliseconds. The exit status must come from
    gevent's child watcher, registered before anything can yield. On v1 the calling thread
    sits in the session's cgroups for the fork (the child is born there: no window); what
    failed of its way back is returned beside the process."""
    if scope is not None:
        scope.enter()
    stuck: list[str] = []
    try:
        proc = subprocess.Popen(
            argv, executable=executable, stdin=stdio, stdout=stdio, stderr=err,
            bufsize=0, close_fds=True, start_new_session=new_session, env=env, cwd=cwd, umask=umask,
        )  # fmt: skip
    finally:
        if scope is not None:
            stuck = scope.leave()
    return proc, stuck
