"""gsrv's side of the spawner (gsrv/spawn/spawner.py): requests out, answers and exits in,
without ever blocking the loop; a spawner that dies is replaced, and what it held is accounted.

A request is one SOCK_SEQPACKET message (spawn/wire.py) with the child's stdio as SCM_RIGHTS, sent
without waiting: a full socket or no spawner is EAGAIN, a resource error the gate parks for.
Answers arrive in batches and are dispatched from an io watcher: a `Process` learns its pid (or
its error), its exit status, and once gsrv asked for the reap, its rusage. gsrv is the
children's subreaper: if the spawner dies, its children become gsrv's, gsrv's own child
watcher hears of their ends, and a child whose answer was lost is killed with its group.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import gevent
import psutil
from gevent import get_hub
from gevent.event import Event

from gsrv.contain.cgfiles import remove_tree
from gsrv.contain.scope import Shape
from gsrv.errors import SpawnError
from gsrv.logs import Log, log_lines_from
from gsrv.loop import READ, ChildWatcher, Watcher
from gsrv.spawn import wire
from gsrv.spawn.process import Process

READ_MAX = 1 << 20
RESTART_S = 0.1  # after a spawner died young: doubling up to RESTART_MAX_S
RESTART_MAX_S = 5.0
YOUNG_S = 1.0  # a spawner that dies sooner than this after its start is restarted with backoff
CLOSE_WAIT_S = 1.0
PR_SET_CHILD_SUBREAPER = 36


def _subreaper() -> None:
    """Orphans of the sessions (and the children of a dead spawner) become gsrv's to reap."""
    import ctypes  # here: only gsrv's own process calls this

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


PYTHON_SPAWNER = (sys.executable, "-m", "gsrv.spawn.spawner")


class Spawner:
    """The spawner process and gsrv's end of its socket. `homes`: the cgroup files it writes
    "0" into to go back after a spawn (where it lives). `known` answers whether a pid is one
    gsrv knows other than a session's child (its guardian), for the count after a death.
    `program`: the spawner's argv before its arguments (the Python one, or the compiled
    gsrv-spawner: config/spawner.py chooses), `impl` its name in the log."""

    def __init__(self, log: Log, homes: tuple[str, ...] = (), known: Callable[[int], bool] = lambda pid: False,
                 program: tuple[str, ...] = PYTHON_SPAWNER, impl: str = "python") -> None:  # fmt: skip
        self.log = log
        self.homes = homes
        self.known = known
        self.program, self.impl = program, impl
        self.generation = 0
        self.cgroups_left = 0  # session cgroups it (or gsrv) could not remove behind their sessions
        self._pid = 0  # the spawner process running now (0: none yet)
        self._popen: subprocess.Popen[bytes] | None = None  # kept: one collected would reap the spawner itself
        self.stderr_fd = -1  # gsrv's end of its stderr, read into the log
        self.sock: socket.socket | None = None
        self.started_at = 0.0
        self._seq = itertools.count(1)
        self._pending: dict[int, tuple[Process, float]] = {}  # seq -> the process asked for, when
        self._processes: dict[int, Process] = {}  # pid -> a child not yet reaped
        self._reaps: list[tuple[int, tuple[str, ...]]] = []
        self._reap_due = False
        self._watch: Watcher | None = None
        self._any_child: ChildWatcher | None = None
        self._backoff = RESTART_S
        self._closed = False
        self._restarting: gevent.Greenlet | None = None
        self._gone = Event()  # the current spawner process exited (gsrv reaped it)
        self._buffer = bytearray(READ_MAX)  # its answers are read into this

    @property
    def pid(self) -> int:
        return self._pid

    def start(self) -> None:
        """Become the subreaper and start the spawner (at serve, before any session)."""
        loop = get_hub().loop
        loop.install_sigchld()
        _subreaper()
        self._any_child = loop.child(0)
        self._any_child.start(self._child_status, self._any_child)
        self._launch()

    def adopt(self, pid: int, sock_fd: int, stderr_fd: int, generation: int, processes: list[Process]) -> None:
        """An upgrade's new code takes over the spawner the previous code ran (gsrv/upgrade):
        its socket and stderr as the record names them, the children it holds. It speaks this
        wire's version (the check refused a new code that does not), so no Hello is sent."""
        loop = get_hub().loop
        loop.install_sigchld()
        _subreaper()
        self._any_child = loop.child(0)
        self._any_child.start(self._child_status, self._any_child)
        self._pid, self.generation, self.stderr_fd = pid, generation, stderr_fd
        log_lines_from(stderr_fd, self.log, "spawner")
        self.sock = socket.socket(fileno=sock_fd)
        self.sock.setblocking(False)
        self.started_at = time.monotonic()
        self._processes = {process.pid: process for process in processes}
        self._watch = get_hub().loop.io(sock_fd, READ)
        self._watch.start(self._readable)
        get_hub().loop.run_callback(self._readable)  # answers that queued in the socket across the exec

    def handed_over(self) -> dict[str, object]:
        """What the new code needs to adopt it (the fds are the record's: `sock`, `stderr_fd`);
        an upgrade execs only once it is `quiet`."""
        return {"pid": self._pid, "generation": self.generation, "impl": self.impl, "wire": wire.VERSION}

    @property
    def quiet(self) -> bool:
        """No spawn in flight and no reap waiting to be sent: its state is all in its children."""
        return not self._pending and not self._reaps and self.sock is not None

    def _launch(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [*self.program, str(theirs.fileno()), str(self.generation + 1), *self.homes],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=[theirs.fileno()], close_fds=True, start_new_session=True,
            )  # fmt: skip
        finally:
            theirs.close()
        assert proc.stderr is not None
        self._popen, self._pid, self.stderr_fd = proc, proc.pid, os.dup(proc.stderr.fileno())
        log_lines_from(self.stderr_fd, self.log, "spawner")  # its stderr: log lines
        proc.stderr.close()
        ours.sendall(wire.encode(wire.Hello(wire.VERSION)))  # first, while the socket is still blocking
        ours.setblocking(False)
        self.sock = ours
        self._gone.clear()
        self.generation += 1
        self.started_at = time.monotonic()
        self._watch = get_hub().loop.io(ours.fileno(), READ)
        self._watch.start(self._readable)
        self.log.info("spawner_started", pid=self._pid, generation=self.generation, impl=self.impl)

    # -- requests ---------------------------------------------------------------------------

    def spawn(self, argv: tuple[str, ...], executable: str, env: dict[str, str], cwd: str | None, umask: int,
              stdio: tuple[int, int, int], setsid: bool = True, cgroup: Shape = wire.NO_CGROUP,
              at_exit: int = wire.HOLD) -> Process:  # fmt: skip
        """Ask for one child without waiting; the answer comes to the Process returned (its
        `started` is set). stdio: gsrv's fds for 0, 1, 2 (-1: /dev/null); cgroup: the Shape of
        the cgroups it is born in; at_exit: what the spawner does at its exit (wire.HOLD, ...).
        Raises SpawnError: EAGAIN when the spawner cannot take it now, EINVAL for a request no
        child can have (a NUL in an argument or a variable)."""
        sock = self.sock
        if sock is None:
            raise SpawnError("no spawner is running (it is being restarted)", errno.EAGAIN)
        fds = sorted({fd for fd in stdio if fd >= 0})
        at = (_index(stdio[0], fds), _index(stdio[1], fds), _index(stdio[2], fds))
        seq = next(self._seq)
        if any("=" in name for name in env):
            raise SpawnError(f"illegal environment variable name: {next(n for n in env if '=' in n)!r}", errno.EINVAL)
        variables = tuple([f"{name}={value}" for name, value in env.items()])
        try:
            message = wire.encode(wire.Spawn(seq, argv, executable, variables, cwd or "", umask, at, setsid, cgroup,
                                             at_exit))  # fmt: skip
        except wire.WireError as e:
            raise SpawnError(str(e), errno.EINVAL) from None
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, memoryview(bytes(_ints(fds))))] if fds else []
        try:
            sock.sendmsg([message], ancillary)
        except BlockingIOError:
            raise SpawnError("the spawner is behind (its socket is full)", errno.EAGAIN) from None
        except OSError as e:  # it died, and its EOF is not read yet: a new one comes
            raise SpawnError(f"cannot reach the spawner ({e.strerror}): waiting for a new one", errno.EAGAIN) from None
        process = Process(self.generation, at_exit)
        self._pending[seq] = (process, time.time())
        return process

    def reap(self, process: Process, cgroups: tuple[str, ...] = ()) -> None:
        """The stop ladder is done: the spawner may reap the child (its pid is free from then
        on) and remove its cgroups behind. `reaped` is set once it has, or at once if that
        spawner is gone (gsrv reaped the child; the cgroups are removed here). One the spawner
        reaps at its exit is never named (its pid may be another child's by now): only its
        cgroups, unless the spawner removed them too."""
        if process.reaping:
            return
        process.reaping = True
        if process.reaped_at_exit and process.generation == self.generation and process.pid:
            if cgroups and not (process.alone and process.at_exit == wire.REAP_AND_REMOVE_IF_EMPTY):
                self._queue_reap(0, cgroups)
            return
        if process.generation != self.generation or not process.pid:
            process.reaped.set()
            if self._processes.get(process.pid) is process:
                del self._processes[process.pid]
            left = [left for path in cgroups for left in remove_tree(path)]
            self.cgroups_left += len(left)
            if left:
                self.log.warning("cgroup_left", cgroups=",".join(left), next="removed at gsrv's stop, or by its "
                                 "guardian, once empty")  # fmt: skip
            return
        self._queue_reap(process.pid, cgroups)

    def _queue_reap(self, pid: int, cgroups: tuple[str, ...]) -> None:
        self._reaps.append((pid, cgroups))
        if not self._reap_due:
            self._reap_due = True
            get_hub().loop.run_callback(self._send_reaps)

    def _send_reaps(self) -> None:
        self._reap_due = False
        if not self._reaps or self.sock is None:
            return
        try:
            self.sock.send(wire.encode(*(wire.Reap(pid, cgroups) for pid, cgroups in self._reaps)))
            self._reaps.clear()
        except BlockingIOError:  # try again in a moment: the zombies wait
            gevent.spawn_later(0.01, self._send_reaps)
        except OSError:
            pass  # the spawner is gone: _died() settles them

    # -- answers ----------------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self.sock
        assert sock is not None
        while True:
            try:
                size = sock.recv_into(self._buffer)  # one buffer for every read: recv(1 MiB) made one each
            except BlockingIOError:
                return
            except OSError:
                size = 0
            data = self._buffer[:size]
            if not data:
                self._died()
                return
            try:
                for report in wire.decode(data):
                    self._dispatch(report)
            except wire.WireError as e:  # not gsrv's spawner, or not of this gsrv's version
                self.log.error("spawner_wire", pid=self.pid, error=str(e), next="a new spawner")
                self._died()
                return

    def _dispatch(self, report: wire.Message) -> None:
        if isinstance(report, wire.Spawned | wire.Failed):
            pending = self._pending.pop(report.seq, None)
            if pending is None:
                return
            process = pending[0]
            if isinstance(report, wire.Spawned):
                process.pid, process.stuck, process.cgroup = report.pid, list(report.stuck), report.cgroup
                self._processes[process.pid] = process
                if process.error is not None:  # its session gave up waiting: nobody runs its ladder
                    with contextlib.suppress(OSError):
                        os.kill(process.pid, signal.SIGKILL)
                    self.reap(process)  # at its exit
                    return
            else:
                process.error = SpawnError(report.why, report.errno)
            process.started.set()
        elif isinstance(report, wire.Exited):
            found = self._processes.get(report.pid)
            if found is not None and found.status is None:
                found.status, found.alone = report.status, report.alone
                found.exited.set()
        elif isinstance(report, wire.Left):
            self.cgroups_left += len(report.cgroups)
            self.log.warning("cgroup_left", cgroups=",".join(report.cgroups),
                             next="removed at gsrv's stop, or by its guardian, once empty")  # fmt: skip
        elif isinstance(report, wire.Reaped):
            found = self._processes.pop(report.pid, None)
            if found is not None:
                found.rusage = (report.cpu_ms, report.maxrss_kib)
                found.reaped.set()
        elif isinstance(report, wire.Hello) and report.version != wire.VERSION:
            raise wire.WireError(f"the spawner speaks wire version {report.version}, gsrv {wire.VERSION}")

    def _child_status(self, watcher: ChildWatcher) -> None:
        """gsrv's own children: the spawner itself, and the children of a dead spawner, which
        gsrv (their subreaper) reaps; any other orphan of a session needs nothing more."""
        pid, status = watcher.rpid, watcher.rstatus
        if pid == self.pid:
            self._gone.set()
        if pid not in self._processes and self.sock is not None:
            self._readable()  # the dead spawner's last answers may name it (child watchers run first)
        found = self._processes.pop(pid, None)
        if found is None:
            return
        if found.status is None:
            found.status = status
            found.exited.set()
        found.reaped.set()

    # -- a spawner's death ------------------------------------------------------------------

    def _died(self) -> None:
        """Its in-flight spawns fail; its children are gsrv's now (their exits come through
        _child_status); a child whose answer was lost is killed with its group; a new spawner."""
        self._disconnect()
        if self._closed:
            return
        self._reaps.clear()  # its children are gsrv's now: gsrv's own watcher reaps them
        pending, self._pending = self._pending, {}
        for process, _sent in pending.values():
            process.error = SpawnError("the spawner died before it answered")
            process.started.set()
        lived = time.monotonic() - self.started_at
        killed = self._kill_lost(min((sent for _, sent in pending.values()), default=None))
        self._backoff = RESTART_S if lived >= YOUNG_S else min(self._backoff * 2, RESTART_MAX_S)
        delay = 0.0 if lived >= YOUNG_S else self._backoff
        self.log.error("spawner_died", pid=self.pid, lived_s=round(lived, 2), in_flight=len(pending),
                       lost_killed=killed or None, next=f"a new spawner in {delay:g}s")  # fmt: skip
        self._restarting = gevent.spawn_later(delay, self._restart)

    def _disconnect(self) -> bool:
        """gsrv's end of the socket closed and unwatched; whether it was open."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self.sock is None:
            return False
        self.sock.close()
        self.sock = None
        return True

    def _restart(self) -> None:
        if not self._closed and self.sock is None:
            try:
                self._launch()
            except OSError as e:
                self.log.error("spawner_failed", error=e.strerror or str(e), next=f"again in {RESTART_MAX_S:g}s")
                self._restarting = gevent.spawn_later(RESTART_MAX_S, self._restart)

    def _kill_lost(self, since: float | None) -> int:
        """Children of gsrv that no session knows, started since the oldest request in flight
        and leading a session of their own: spawned for a request whose answer was lost."""
        if since is None:
            return 0
        killed = 0
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children():
                if child.pid in self._processes or child.pid == self.pid or self.known(child.pid):
                    continue
                with contextlib.suppress(psutil.Error, OSError):
                    if child.create_time() >= since - 1 and os.getsid(child.pid) == child.pid:
                        os.killpg(child.pid, signal.SIGKILL)
                        killed += 1
        return killed

    def close(self) -> None:
        """At gsrv's stop, every session reaped: EOF ends the spawner (a spawn still asked
        for fails; its child, if it started, ends with the spawner's cgroups by the guardian)."""
        self._closed = True
        pending, self._pending = self._pending, {}
        for process, _sent in pending.values():
            process.error = SpawnError("gsrv is stopping")
            process.started.set()
        if self._restarting is not None:
            self._restarting.kill(block=False)
        if self._disconnect():
            self._gone.wait(CLOSE_WAIT_S)  # out of its cgroup leaf, so the leaf can go
        if self._any_child is not None:
            self._any_child.stop()


def _index(fd: int, fds: list[int]) -> int:
    """Where a stdio fd goes among the request's SCM_RIGHTS fds; -1 (/dev/null) stays."""
    return -1 if fd < 0 else fds.index(fd)


def _ints(values: list[int]) -> bytes:
    import array

    return array.array("i", values).tobytes()
