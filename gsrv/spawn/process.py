"""One child as the spawner reports it (spawn/client.py fills it in from the spawner's answers):
its pid or error, its exit status, its reap and rusage; what relay/child.py's ladder waits on.
"""

from __future__ import annotations

from gevent.event import Event

from gsrv.errors import SpawnError
from gsrv.spawn import wire


class Process:
    """One child as the spawner reports it."""

    __slots__ = ("pid", "error", "stuck", "cgroup", "started", "exited", "status", "reaped", "rusage", "generation",
                 "reaping", "at_exit", "alone")  # fmt: skip

    def __init__(self, generation: int, at_exit: int = wire.HOLD) -> None:
        self.pid = 0
        self.error: SpawnError | None = None
        self.stuck: list[str] = []  # the cgroup writes of the spawner's way home that failed
        self.cgroup = ""  # the name of the cgroups it was started in (made ahead by the spawner)
        self.started = Event()  # the spawner answered (pid or error)
        self.exited = Event()
        self.status: int | None = None  # the wait() status word
        self.reaped = Event()
        self.rusage: tuple[float, int] | None = None  # cpu ms, maxrss KiB: the child and what it waited for
        self.generation = generation
        self.reaping = False  # asked for once: a second ask could name a reused pid
        self.at_exit = at_exit  # what the spawner does at its exit (wire.HOLD, REAP, ...)
        self.alone = False  # nothing of its cgroup was left at its exit: reaped then (no ladder signals)

    @property
    def reaped_at_exit(self) -> bool:
        """The spawner reaps it at its exit, unasked: gsrv must never name its pid in a Reap."""
        return self.at_exit == wire.REAP or self.alone
