"""No orphans: a small guardian process ends every session's processes when gsrv dies.

Children run in sessions of their own (so a supervisor's group kill does not reach them),
and a gsrv killed with SIGKILL cannot end them itself. gsrv tells the guardian, through a
pipe, each process group it starts ("+PGID") and reaps ("-PGID"), and at its start the
cgroup root it owns; when the pipe reaches EOF (gsrv is gone, however it ended) the guardian
sends TERM, then KILL, to the groups left and to every process in the cgroups below that
root (frozen while signalled), then removes those cgroups.
Run as `python -m gsrv.spawn.guardian [MODE DIR...]`; it ignores SIGINT, SIGTERM and SIGHUP:
only EOF ends it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from gsrv.contain.cgfiles import freeze, remove_tree, tasks

if TYPE_CHECKING:
    from gsrv.logs import Log

GRACE_S = 2.0
POLL_S = 0.1
PENDING_MAX = 1024 * 1024  # reports kept while the pipe is full (64 KiB: ~4 s at 1,000 sessions/s)


class Guardian:
    """gsrv's side: starts the guardian and reports process groups to it.

    Reports made during one turn of gsrv's event loop go out in one write at the end of
    that turn (a burst of accepted sessions costs one wake-up of the guardian, not one per
    child). A group is thus reported before gsrv next waits for events.
    """

    def __init__(self, log: Log, cgroup_mode: str = "", cgroups: tuple[str, ...] = ()) -> None:
        from gevent import get_hub  # here: the guardian process itself never loads gevent

        self.log = log
        self._args = [cgroup_mode, *cgroups] if cgroups else []
        self.proc: subprocess.Popen[bytes] | None = None
        self._pid = 0
        self._fd = -1  # the pipe's write end: its EOF is gsrv's end
        self.stderr_fd = -1  # gsrv's end of its stderr, read into the log
        self._pending = bytearray()
        self._loop = get_hub().loop
        self._flush_due = False
        self._closed = False

    def start(self) -> None:
        """The guardian process (once gsrv's listeners are bound: a start that fails starts none)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gsrv.spawn.guardian", *self._args], stdin=subprocess.PIPE, bufsize=0,
            stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stderr is not None
        from gsrv.logs import log_lines_from  # gevent's: gsrv's side only

        self.stderr_fd = os.dup(self.proc.stderr.fileno())
        log_lines_from(self.stderr_fd, self.log, "guardian")  # its stderr: log lines
        self.proc.stderr.close()
        self._pid, self._fd = self.proc.pid, self.proc.stdin.fileno()
        os.set_blocking(self._fd, False)

    def handed_over(self) -> dict[str, object]:
        """What the new code needs to adopt it (the fds are the record's): its pid, and reports
        the pipe could not take yet (they go first after the exec)."""
        self._flush()
        return {"pid": self._pid, "pending": self._pending.decode()}

    def adopt(self, pid: int, fd: int, stderr_fd: int, pending: str = "") -> None:
        """An upgrade's new code takes over the guardian the previous code ran: its pipe's write
        end and its stderr, as the record names them (gsrv/upgrade). It saw no EOF: the fds were
        inherited across the exec, and the groups it tracks are still the sessions'."""
        from gsrv.logs import log_lines_from

        self._pid, self._fd, self.stderr_fd = pid, fd, stderr_fd
        os.set_blocking(fd, False)
        log_lines_from(stderr_fd, self.log, "guardian")
        if pending:
            self._send(pending.encode())

    @property
    def fd(self) -> int:
        """The pipe's write end (an upgrade hands it over): -1 once closed."""
        return -1 if self._closed else self._fd

    @property
    def pid(self) -> int:
        return self._pid

    def owns(self, pid: int) -> bool:
        """Whether `pid` is the guardian itself (gsrv's child, not a session's)."""
        return pid != 0 and pid == self.pid

    def _send(self, line: bytes) -> None:
        self._pending += line
        if not self._flush_due:
            self._flush_due = True
            self._loop.run_callback(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self._closed or self._fd < 0:
            return
        try:
            written = os.write(self._fd, self._pending)
        except BlockingIOError:
            written = 0
        except OSError:  # the guardian is gone: nothing left to tell
            written = len(self._pending)
        del self._pending[:written]
        del self._pending[:-PENDING_MAX]  # bounded, should the guardian ever fall this far behind

    def track(self, pgid: int) -> None:
        self._send(b"+%d\n" % pgid)

    def untrack(self, pgid: int) -> None:
        self._send(b"-%d\n" % pgid)

    def close(self) -> None:
        """A clean stop: every group was reaped; EOF lets the guardian exit at once."""
        if self._fd < 0 or self._closed:
            return
        self._flush()
        self._closed = True  # a flush still scheduled must not write to a reused fd number
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
        else:
            os.close(self._fd)


def _end_groups(groups: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in list(groups):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                groups.discard(pgid)
        deadline = time.monotonic() + GRACE_S
        while groups and time.monotonic() < deadline:
            time.sleep(0.05)
            for pgid in list(groups):
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    groups.discard(pgid)


def _end_cgroups(mode: str, dirs: list[str]) -> None:
    """TERM, then KILL, every process below gsrv's root (frozen meanwhile, so none forks past
    it), then remove the cgroups. v1: the first dir is the freezer hierarchy's."""
    top = dirs[0]
    if not os.path.isdir(top):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(OSError):
            freeze(top, mode, True)
        time.sleep(0.05)
        for pid in tasks(top):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(OSError):
            freeze(top, mode, False)
        deadline = time.monotonic() + GRACE_S
        while tasks(top) and time.monotonic() < deadline:
            time.sleep(0.05)
    for path in dirs:
        remove_tree(path)


def main() -> int:
    """Read reports until EOF. The guardian polls its pipe instead of waiting in read():
    a reader waiting in read() is woken by every write, and each wake-up cost gsrv ~7% of
    its time at 600 sessions/s. Reports wait in the pipe; EOF is seen within POLL_S."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    cgroup_mode, *cgroups = sys.argv[1:] or [""]
    groups: set[int] = set()
    os.set_blocking(0, False)  # our end of a pipe made for us alone
    partial = b""
    while True:
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            time.sleep(POLL_S)
            continue
        if not data:
            break
        *lines, partial = (partial + data).split(b"\n")
        for line in lines:
            sign, number = line[:1], line[1:]
            if number.isdigit():
                (groups.add if sign == b"+" else groups.discard)(int(number))
    if groups:
        _end_groups(groups)
    if cgroups:
        _end_cgroups(cgroup_mode, cgroups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
