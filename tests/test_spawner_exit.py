"""What the spawner, the compiled one and the Python one, does at a child's exit (a Spawn's
`at_exit`, gsrv/spawn/wire.py), spoken to over its wire: a zombie held until gsrv's Reap
wherever gsrv's ladder may still signal the pid or the group (invariant 4), and the exit and
the reap in one answer where it cannot."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SPAWNERS, wait_until

from gsrv.config.spawner import C_SPAWNER
from gsrv.contain.cgfiles import remove_tree, tasks
from gsrv.contain.host import discover
from gsrv.contain.scope import Shape
from gsrv.spawn import wire
from gsrv.spawn.client import PYTHON_SPAWNER

HOST = discover()
pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(HOST.mode != "v1", reason="a v1 (or hybrid) cgroup host")]
DAEMON = ("/bin/sh", "-c", "sleep 60 & exit 0")  # exits at once, and leaves a process in its cgroup


class Spawner:
    """A spawner process and our end of its wire."""

    def __init__(self, program: tuple[str, ...], home: str) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([*program, str(theirs.fileno()), "1", home], pass_fds=[theirs.fileno()])
        theirs.close()
        self.sock.settimeout(20)
        self.send(wire.Hello(wire.VERSION))
        assert self.receive() == [wire.Hello(wire.VERSION)]
        self.seq = 0

    def send(self, *messages: wire.Message) -> None:
        self.sock.send(wire.encode(*messages))

    def receive(self) -> list[wire.Message]:
        return wire.decode(self.sock.recv(1 << 16))

    def spawn(self, argv: tuple[str, ...], shape: Shape, at_exit: int) -> wire.Spawned:
        self.seq += 1
        self.send(wire.Spawn(self.seq, argv, argv[0], ("PATH=/usr/bin:/bin",), "", -1, (-1, -1, -1), True, shape,
                             at_exit))  # fmt: skip
        (answer,) = self.receive()
        assert isinstance(answer, wire.Spawned), answer
        return answer

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(20)


@pytest.fixture
def parent() -> Iterator[str]:
    """A freezer cgroup of the test's own, the parent of the spawner's session cgroups."""
    path = os.path.join(HOST.parents["freezer"], f"gsrv-test-exit-{os.getpid()}")
    os.mkdir(path)
    yield path
    for pid in tasks(path):  # a sleep a case left
        os.kill(pid, 9)
    wait_until(lambda: not tasks(path), 10, "the test's cgroup to empty")
    remove_tree(path)


@pytest.fixture(params=SPAWNERS)
def spawner(request: pytest.FixtureRequest) -> Iterator[Spawner]:
    """The compiled spawner and the Python one, each case against both."""
    program = (C_SPAWNER,) if request.param == "c" else PYTHON_SPAWNER
    found = Spawner(program, os.path.join(HOST.homes["freezer"], "tasks"))  # where it goes back after a spawn
    yield found
    found.close()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


@pytest.mark.parametrize("at_exit", [wire.REAP_IF_EMPTY, wire.REAP_AND_REMOVE_IF_EMPTY])
def test_a_child_that_leaves_nothing_in_its_cgroup_is_reaped_in_the_answer_of_its_exit(spawner, parent, at_exit):
    """`true` leaves its cgroup empty: its Exited says so (alone) and its Reaped rides in the same
    datagram, with no Reap asked; the cgroup goes by itself only when gsrv reads nothing of it."""
    shape = Shape((parent,), top=0)
    spawned = spawner.spawn(("/bin/true",), shape, at_exit)
    cgroup = os.path.join(parent, spawned.cgroup)
    exited, reaped = spawner.receive()
    assert exited == wire.Exited(spawned.pid, 0, True), exited
    assert isinstance(reaped, wire.Reaped) and reaped.pid == spawned.pid, reaped
    assert not os.path.exists(f"/proc/{spawned.pid}") or _state(spawned.pid) != "Z"
    if at_exit == wire.REAP_AND_REMOVE_IF_EMPTY:
        wait_until(lambda: not os.path.exists(cgroup), 10, "the spawner to remove the session's cgroup")
    else:
        assert os.path.isdir(cgroup)  # the counters stay for gsrv's read
        spawner.send(wire.Reap(0, (cgroup,)))  # pid 0: only the cgroups
        wait_until(lambda: not os.path.exists(cgroup), 10, "the spawner to remove the session's cgroup")


@pytest.mark.parametrize("at_exit", [wire.REAP_IF_EMPTY, wire.REAP_AND_REMOVE_IF_EMPTY])
def test_a_child_that_leaves_a_process_behind_stays_a_zombie_until_gsrvs_reap(spawner, parent, at_exit):
    """A daemon left in the cgroup: gsrv's ladder will signal it and the group, so the leader's
    zombie is held (its pid and group id stay taken) until the Reap, and its cgroup stays."""
    shape = Shape((parent,), top=0)
    spawned = spawner.spawn(DAEMON, shape, at_exit)
    cgroup = os.path.join(parent, spawned.cgroup)
    (exited,) = spawner.receive()
    assert exited == wire.Exited(spawned.pid, 0, False), exited
    assert _state(spawned.pid) == "Z" and tasks(cgroup), "the zombie held, the daemon in the cgroup"
    for pid in tasks(cgroup):
        os.kill(pid, 9)
    wait_until(lambda: not tasks(cgroup), 10, "the daemon's end")
    assert _state(spawned.pid) == "Z"
    spawner.send(wire.Reap(spawned.pid, (cgroup,)))
    (reaped,) = spawner.receive()
    assert isinstance(reaped, wire.Reaped) and reaped.pid == spawned.pid, reaped
    wait_until(lambda: not os.path.exists(cgroup), 10, "the spawner to remove the session's cgroup")


def test_hold_keeps_the_zombie_and_reap_does_not(spawner):
    """HOLD: the zombie until the Reap, whatever is left; REAP (kill_scope = "group"): the
    Reaped with the Exited, unasked."""
    held = spawner.spawn(("/bin/true",), wire.NO_CGROUP, wire.HOLD)
    (exited,) = spawner.receive()
    assert exited == wire.Exited(held.pid, 0, False) and _state(held.pid) == "Z"
    spawner.send(wire.Reap(held.pid, ()))
    (reaped,) = spawner.receive()
    assert isinstance(reaped, wire.Reaped) and reaped.pid == held.pid
    at_once = spawner.spawn(("/bin/true",), wire.NO_CGROUP, wire.REAP)
    exited, reaped = spawner.receive()
    assert exited == wire.Exited(at_once.pid, 0, False)
    assert isinstance(reaped, wire.Reaped) and reaped.pid == at_once.pid
