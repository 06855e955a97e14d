"""The spawner's cgroups: a few made ahead for each kind of session (a pool, filled when the
spawner is idle), taken one per spawn and never used twice, and removed behind once their
session is done (a sweeper, also when idle). So no mkdir or rmdir waits in a spawn.

A kind is a Shape (gsrv/contain/scope.py), as a spawn request carries it (gsrv/spawn/wire.py).
Pool cgroups are named c<generation>-<n>: a name says nothing of the session that gets it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

from gsrv.contain.cgfiles import remove_tree, write
from gsrv.contain.scope import Shape

READY = 4  # cgroups made ahead per kind
FORGET_S = 60.0  # a kind not asked for this long has its ready cgroups removed
SWEEP_TRIES = 8  # a busy cgroup is tried again after 0.1 s, doubling; then it is reported left
SWEEP_FIRST_S = 0.1


@dataclass
class Kind:
    ready: deque[str] = field(default_factory=deque)
    asked: float = 0.0


@dataclass(order=True)
class Removal:
    due: float
    tries: int
    paths: tuple[str, ...]


class Pool:
    def __init__(self, generation: int) -> None:
        self.prefix = f"c{generation}-"
        self.count = 0
        self.kinds: dict[Shape, Kind] = {}
        self.removals: deque[Removal] = deque()  # due now
        self.retries: list[Removal] = []  # busy before: due later
        self.left: list[str] = []  # cgroups that stayed busy: reported to gsrv

    def take(self, shape: Shape) -> str:
        """A cgroup of this kind, made ahead if one is ready, else now. Raises OSError."""
        kind = self.kinds.setdefault(shape, Kind())
        kind.asked = time.monotonic()
        return kind.ready.popleft() if kind.ready else self._make(shape)

    def _make(self, shape: Shape) -> str:
        parents = shape.parents
        name = self._name(parents)
        made = [os.path.join(parents[0], name)]
        try:
            for parent in parents[1:]:
                os.mkdir(os.path.join(parent, name))
                made.append(os.path.join(parent, name))
            for index, file, text, optional in shape.limits:
                path = os.path.join(parents[index], name, file)
                if not optional or os.path.exists(path):
                    write(path, text)
        except OSError:
            for path in made:
                remove_tree(path)
            raise
        return name

    def _name(self, parents: tuple[str, ...]) -> str:
        """The next name not taken, made in the first parent (an earlier spawner of this gsrv
        may have left one: a new spawner counts from 1 again)."""
        while True:
            self.count += 1
            name = f"{self.prefix}{self.count}"
            try:
                os.mkdir(os.path.join(parents[0], name))
            except FileExistsError:
                continue
            return name

    @staticmethod
    def paths(shape: Shape, name: str) -> tuple[str, ...]:
        return tuple(os.path.join(parent, name) for parent in shape.parents)

    def remove(self, paths: tuple[str, ...]) -> None:
        """Behind: rmdir when the spawner is idle."""
        self.removals.append(Removal(0.0, 0, paths))

    def idle_work(self) -> float | None:
        """One step of idle work: a removal due, else a cgroup made ahead. Returns how long
        until there is more (0: at once), or None when there is none."""
        now = time.monotonic()
        if self.removals:
            self._sweep(self.removals.popleft(), now)
            return 0.0
        due = min(self.retries, default=None)
        if due is not None and due.due <= now:
            self.retries.remove(due)
            self._sweep(due, now)
            return 0.0
        for shape, kind in list(self.kinds.items()):
            if now - kind.asked > FORGET_S:
                del self.kinds[shape]
                for name in kind.ready:
                    self.remove(self.paths(shape, name))
                return 0.0
            if len(kind.ready) < READY:
                try:
                    kind.ready.append(self._make(shape))
                except OSError:  # the next spawn makes its own, and says why if it cannot
                    kind.asked = 0.0
                return 0.0
        return None if due is None else due.due - now

    def _sweep(self, removal: Removal, now: float) -> None:
        busy = tuple(left for path in removal.paths for left in remove_tree(path))
        if not busy:
            return
        if removal.tries + 1 >= SWEEP_TRIES:
            self.left.extend(busy)
            return
        delay = SWEEP_FIRST_S * 2**removal.tries
        self.retries.append(Removal(now + delay, removal.tries + 1, busy))
