"""A child's stdio as the spawner gets it (its fds 0, 1, 2) and gsrv's ends of it, made by the
child end of a relay: pipes, a pseudo-terminal, or the connection itself (socket handoff).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from gsrv.errors import SpawnError


@dataclass
class Stdio:
    """A child's fds 0, 1 and 2 as the spawner gets them (`theirs`, -1: /dev/null) and gsrv's
    ends of them. The child end of a relay makes it: pipes, a pty, or the connection itself."""

    theirs: tuple[int, int, int]
    stdin: int = -1
    stdout: int = -1
    stderr: int = -1
    pty_master: int = -1  # a pty's master: stdin and stdout both
    made: list[int] = field(default_factory=list)  # the child's ends gsrv made: closed once sent
    socket: int = -1  # a connection made blocking for the child (socket handoff)

    @classmethod
    def pipes(cls, stderr: str) -> Stdio:
        with _undone() as made:
            stdin, theirs_in = _pipe(made, reverse=True)
            stdout, theirs_out = _pipe(made)
            err, theirs_err = _stderr(made, stderr, theirs_out)
            theirs = (theirs_in, theirs_out, theirs_err)
            return cls(theirs, stdin, stdout, err, made=_made(made, theirs))

    @classmethod
    def pty(cls, stderr: str) -> Stdio:
        with _undone() as made:
            master, slave = os.openpty()
            made += [master, slave]
            os.set_blocking(master, False)
            err, theirs_err = _stderr(made, stderr, slave)
            theirs = (slave, slave, theirs_err)
            return cls(theirs, master, master, err, master, made=_made(made, theirs))

    @classmethod
    def connection(cls, fd: int, stderr: str) -> Stdio:
        """Socket handoff: the connection as stdin and stdout, blocking as inetd programs expect
        (gsrv does no I/O on it until the child's group is gone)."""
        with _undone() as made:
            err, theirs_err = _stderr(made, stderr, fd)
            os.set_blocking(fd, True)
            theirs = (fd, fd, theirs_err)
            return cls(theirs, stderr=err, made=_made(made, theirs), socket=fd)

    def sent(self) -> None:
        """The spawner has its copies: gsrv's of the child's ends go."""
        for fd in self.made:
            os.close(fd)
        self.made = []

    def unused(self) -> None:
        """The spawn failed: every fd made goes, and the connection is gsrv's again."""
        self.sent()
        for fd in {self.stdin, self.stdout, self.stderr} - {-1}:
            os.close(fd)
        self.stdin = self.stdout = self.stderr = self.pty_master = -1
        if self.socket >= 0:
            os.set_blocking(self.socket, False)


@contextlib.contextmanager
def _undone() -> Iterator[list[int]]:
    """The fds made so far, closed if making the rest raised (EMFILE: a resource error)."""
    made: list[int] = []
    try:
        yield made
    except OSError as e:
        for fd in made:
            os.close(fd)
        raise SpawnError(f"cannot make the child's stdio: {e.strerror}", e.errno) from None


def _made(made: list[int], theirs: tuple[int, int, int]) -> list[int]:
    """The child's ends that gsrv made (each once): gsrv closes them once the spawner has them."""
    return [fd for fd in dict.fromkeys(theirs) if fd in made]


def _pipe(made: list[int], reverse: bool = False) -> tuple[int, int]:
    """(gsrv's end, the child's end); gsrv's is non-blocking."""
    read, write = os.pipe2(os.O_CLOEXEC)
    made += [read, write]
    ours, theirs = (write, read) if reverse else (read, write)
    os.set_blocking(ours, False)
    return ours, theirs


def _stderr(made: list[int], stderr: str, stdout: int) -> tuple[int, int]:
    if stderr in ("log", "websocket"):
        return _pipe(made)
    return -1, stdout if stderr == "stdout" else -1
