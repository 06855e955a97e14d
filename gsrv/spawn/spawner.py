"""The spawner: the process that starts every session's child, so gsrv's event loop never forks.

Run by gsrv as `python -m gsrv.spawn.spawner CONTROL_FD GENERATION HOME...`; plain Python (no gevent),
single-threaded, few fds open. Over CONTROL_FD (a SOCK_SEQPACKET socketpair) it takes spawn
requests, their stdio arriving as SCM_RIGHTS, and answers with the pid or an errno; it reports
each child's exit (`waitid(WNOWAIT)` on a pidfd: the child stays a zombie, so the pid and its
process group cannot be reused) and reaps it (wait4, for its rusage) when gsrv says its stop
ladder is done, or at the exit where the request's `at_exit` says the ladder can signal
nothing after it (a process group; a session cgroup left empty). For a spawn it places itself
in the session's cgroups ("0" to each tasks or cgroup.procs file) and goes back to HOME in
those hierarchies after, so the child is born inside.
It exits at EOF on CONTROL_FD (gsrv is gone); its children then belong to gsrv's guardian.
Its session cgroups come from a pool it fills when idle (gsrv/spawn/pool.py), and it removes
them once gsrv says a session is done (or at the exit, with REAP_AND_REMOVE_IF_EMPTY). Imports
only the wire (gsrv/spawn/wire.py: the messages both sides speak) and cgroup file operations of
gsrv: gsrv's side is gsrv/spawn/client.py. gsrv/spawn/spawner.c is the same process in C.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import sys

from gsrv.contain.cgfiles import has_cgroups_below, read
from gsrv.spawn import wire
from gsrv.spawn.pool import Pool

MESSAGE_MAX = 1 << 20  # a request: argv and environment (the socket's buffer is the real bound)
FDS_MAX = 3  # the child's stdin, stdout, stderr
BATCH_MAX = 512  # reports in one message back
DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)  # Python ignores both; a child must not inherit that
RECV_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
POLL_UNWATCHED_S = 0.05  # a child without a pidfd (the spawner was out of fds) is polled this often


def wait_status(info: os.waitid_result) -> int:
    """A waitid() result as the status word wait() gives (what gsrv's Child reads)."""
    if info.si_code == os.CLD_EXITED:
        return (info.si_status & 0xFF) << 8
    return info.si_status | (0x80 if info.si_code == os.CLD_DUMPED else 0)


class SpawnerLoop:
    """The spawner process's one loop: gsrv's requests, its children's exits, the pool's idle work."""

    def __init__(self, control: socket.socket, generation: int, homes: list[str]) -> None:
        self.control = control
        self.devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self.homes = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in homes]
        # a hierarchy is a file system of its own (v1's co-mounted cpu,cpuacct one): its home by device
        self.home_on = {os.fstat(fd).st_dev: fd for fd in self.homes}
        self.homes_for: dict[tuple[str, ...], list[int]] = {}  # a shape's parents -> the homes it leaves
        self.cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.poll = select.epoll()
        self.poll.register(control.fileno(), select.EPOLLIN)
        self.watched: dict[int, int] = {}  # pidfd -> pid
        self.unwatched: set[int] = set()  # pids whose pidfd could not be opened
        self.reap_at_exit: set[int] = set()  # gsrv asked for the reap before the exit
        self.at_exit: dict[int, tuple[int, str, tuple[str, ...]]] = {}  # pid -> Spawn.at_exit, its top cgroup, all
        self.pidfds: dict[int, int] = {}  # pid -> its pidfd, while watched
        self.out: list[wire.Message] = [wire.Hello(wire.VERSION)]
        self.greeted = False  # gsrv's Hello came: its version is ours
        self.buffer = bytearray(MESSAGE_MAX)
        self.pool = Pool(generation)

    def run(self) -> None:
        """Requests and exits first; when none wait, one step of the pool's idle work."""
        self._go_home([])  # v2: into the leaf of its own, out of the cgroup gsrv may need to empty
        self._flush()  # its Hello: gsrv learns the version before it asks for anything
        idle: float | None = None
        while True:
            timeout = -1.0 if idle is None else idle
            if self.unwatched:
                timeout = POLL_UNWATCHED_S if timeout < 0 else min(timeout, POLL_UNWATCHED_S)
            events = self.poll.poll(timeout)
            for fd, _events in events:
                if fd == self.control.fileno():
                    if not self._requests():
                        return
                else:
                    self._exited(fd)
            if self.unwatched:
                self._poll_unwatched()
            if self.pool.left:
                self.out.append(wire.Left(tuple(self.pool.left)))
                self.pool.left.clear()
            self._flush()
            idle = self.pool.idle_work() if not events else 0.0

    def _requests(self) -> bool:
        """Every request waiting; False at EOF (gsrv is gone)."""
        flags = RECV_FLAGS
        space = socket.CMSG_SPACE(FDS_MAX * 4)
        while True:
            try:
                size, ancillary, msg_flags, _ = self.control.recvmsg_into([self.buffer], space, flags)
            except BlockingIOError:
                return True
            except InterruptedError:
                continue
            fds = [
                fd
                for level, kind, data in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                for fd in memoryview(data).cast("i", (len(data) // 4,)).tolist()
            ]
            if size == 0 and not fds:
                return False
            try:
                truncated = bool(msg_flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC))
                for request in wire.decode(self.buffer[:size]):  # one copy: the codec reads a bytearray too
                    self._handle(request, fds, truncated)
            finally:
                for fd in fds:
                    os.close(fd)

    def _handle(self, request: wire.Message, fds: list[int], truncated: bool) -> None:
        if not self.greeted:
            if not isinstance(request, wire.Hello) or request.version != wire.VERSION:
                raise wire.WireError(f"gsrv's first message is {request!r}: this spawner speaks wire version "
                                     f"{wire.VERSION}")  # fmt: skip
            self.greeted = True
        elif isinstance(request, wire.Reap):
            self._reap(request.pid)
            if request.cgroups:
                self.pool.remove(request.cgroups)
        elif isinstance(request, wire.Spawn):
            self._start(request, fds, truncated)

    def _start(self, request: wire.Spawn, fds: list[int], truncated: bool) -> None:
        if truncated:  # the kernel dropped fds it could not install here: out of fds
            self.out.append(wire.Failed(request.seq, errno.EMFILE, "the spawner is out of file descriptors"))
            return
        shape = request.cgroup
        cgroup = ""
        try:
            if shape.parents:
                cgroup = self.pool.take(shape)
            pid, stuck = self._spawn(request, fds, cgroup)
        except Exception as e:  # one request's, never the spawner's
            if cgroup:
                self.pool.remove(self.pool.paths(shape, cgroup))
            if isinstance(e, OSError):
                what = e.filename if e.filename is not None else request.executable
                self.out.append(wire.Failed(request.seq, e.errno or 0, f"{e.strerror or e}: {what}"))
            else:
                self.out.append(wire.Failed(request.seq, errno.EINVAL, f"{type(e).__name__}: {e}"))
            return
        self.out.append(wire.Spawned(request.seq, pid, tuple(stuck), cgroup))
        if request.at_exit != wire.HOLD:
            paths = self.pool.paths(shape, cgroup) if cgroup else ()
            self.at_exit[pid] = (request.at_exit, paths[shape.top] if paths else "", paths)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            self.unwatched.add(pid)
            return
        self.watched[pidfd] = pid
        self.pidfds[pid] = pidfd
        self.poll.register(pidfd, select.EPOLLIN)

    def _spawn(self, request: wire.Spawn, fds: list[int], cgroup: str) -> tuple[int, list[str]]:
        shape, cwd = request.cgroup, request.cwd
        parents = shape.parents if cgroup else ()
        enter = [os.path.join(parent, cgroup, shape.enter) for parent in parents]
        after = [(os.path.join(parents[i], cgroup, file), text) for i, file, text, _ in shape.after] if cgroup else []
        actions = [(os.POSIX_SPAWN_DUP2, self.devnull if i < 0 else fds[i], n) for n, i in enumerate(request.stdio)]
        env = dict(variable.split("=", 1) for variable in request.env)
        old_umask = os.umask(request.umask) if request.umask >= 0 else -1
        entered = False
        try:
            if cwd:
                os.chdir(cwd)
            for path in enter:
                entered = True
                _write(path, b"0")  # "0": this process (single-threaded: on v1, its one thread)
            pid = os.posix_spawn(
                request.executable,
                request.argv,
                env,
                file_actions=actions,
                setsid=request.setsid,
                setsigdef=DEFAULT_SIGNALS,
            )
        finally:
            stuck = self._go_home(after, self._homes_of(parents)) if entered else []
            if old_umask >= 0:
                os.umask(old_umask)
            if cwd:
                os.fchdir(self.cwd)
        return pid, stuck

    def _homes_of(self, parents: tuple[str, ...]) -> list[int]:
        """The homes in the hierarchies of these parents (those a spawn entered): every home
        when one cannot be told (v2's one tree has one home anyway)."""
        found = self.homes_for.get(parents)
        if found is None:
            try:
                found = list(dict.fromkeys(self.home_on[os.stat(parent).st_dev] for parent in parents))
            except (OSError, KeyError):
                return self.homes
            self.homes_for[parents] = found
        return found

    def _go_home(self, after: list[tuple[str, str]], homes: list[int] | None = None) -> list[str]:
        """The writes due once the child is born (pids.max back to the limit: the spawner
        counted there), then back home in the hierarchies it left (all: `homes` None); what
        failed is returned, never raised."""
        failed = []
        for path, text in after:
            try:
                _write(path, text.encode())
            except OSError as e:
                failed.append(f"{path}: {e.strerror}")
        for fd in self.homes if homes is None else homes:
            try:
                os.write(fd, b"0")
            except OSError as e:
                failed.append(f"home {fd}: {e.strerror}")
        return failed

    def _unwatch(self, pid: int) -> int:
        pidfd = self.pidfds.pop(pid, -1)
        if pidfd >= 0:
            del self.watched[pidfd]
            self.poll.unregister(pidfd)
        return pidfd

    def _exited(self, pidfd: int) -> None:
        """A pidfd became readable: its child exited. An event of a batch may be stale (the
        pidfd closed by a reap in the same batch, its number a new child's): then nothing."""
        pid = self.watched.get(pidfd)
        if pid is None:
            return
        try:
            info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:  # reaped already: its exit was reported with the reap
            info = None
        else:
            if info is None:
                return  # not exited: still watched
        self._unwatch(pid)
        os.close(pidfd)
        if info is not None:
            self._report_exit(pid, wait_status(info))

    def _poll_unwatched(self) -> None:
        for pid in list(self.unwatched):
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
            except ChildProcessError:
                self.unwatched.discard(pid)
                continue
            if info is not None and info.si_pid:
                self.unwatched.discard(pid)
                self._report_exit(pid, wait_status(info))

    def _report_exit(self, pid: int, status: int) -> None:
        """Its Exited; the reap at once where gsrv asked for it before, or its Spawn's at_exit
        allows it (the cgroup empty, for the *_IF_EMPTY modes)."""
        mode, top, paths = self.at_exit.pop(pid, (wire.HOLD, "", ()))
        if pid in self.reap_at_exit:
            self.reap_at_exit.discard(pid)
            self.out.append(wire.Exited(pid, status, False))
            self._reap(pid)
            return
        alone = mode in (wire.REAP_IF_EMPTY, wire.REAP_AND_REMOVE_IF_EMPTY) and _empty(top)
        self.out.append(wire.Exited(pid, status, alone))
        if mode == wire.REAP or alone:
            self._reap(pid)
        if alone and mode == wire.REAP_AND_REMOVE_IF_EMPTY:
            self.pool.remove(paths)

    def _reap(self, pid: int) -> None:
        """gsrv is done with it; one still running (its ladder gave up) is reaped at its exit."""
        if pid <= 0:  # reaped at its exit already (its cgroups come to be removed)
            return
        try:
            found, status, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if found == 0:
            self.reap_at_exit.add(pid)
            return
        pidfd = self._unwatch(pid)  # its exit not reported yet (it came with this request): now
        self.at_exit.pop(pid, None)
        if pidfd >= 0 or pid in self.unwatched:
            self.unwatched.discard(pid)
            if pidfd >= 0:
                os.close(pidfd)
            self.out.append(wire.Exited(pid, status, False))
        self.out.append(wire.Reaped(pid, round((usage.ru_utime + usage.ru_stime) * 1000, 1), usage.ru_maxrss))

    def _flush(self) -> None:
        while self.out:
            batch, self.out = self.out[:BATCH_MAX], self.out[BATCH_MAX:]
            self.control.sendall(wire.encode(*batch))


def _empty(top: str) -> bool:
    """No process is left in the session's cgroup, nor any cgroup below it (a zombie is not
    in it; one that cannot be read may hold some)."""
    if not top:
        return False
    try:
        return not read(os.path.join(top, "cgroup.procs")).split() and not has_cgroups_below(top)
    except OSError:
        return False


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    control = socket.socket(fileno=int(argv[1]))
    os.set_inheritable(control.fileno(), False)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # gsrv is gone
        try:
            SpawnerLoop(control, int(argv[2]), argv[3:]).run()
        except wire.WireError as e:  # not gsrv's peer: said on stderr (gsrv's), and gsrv sees the EOF
            print(f"gsrv's spawner: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
