"""The connections a gate holds for a session slot once their prelude is done, in order, each
with the time it was accepted: with `queue_timeout` (the busy answer), those held past it are
taken out. Pure bookkeeping, no I/O and no clock of its own (the gate gives `now`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

C = TypeVar("C")


class Held(Generic[C]):
    """Connections waiting for a slot, oldest first, with their accept times."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: deque[tuple[C, float]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[C]:
        return (conn for conn, _ in self._items)

    def append(self, conn: C, since: float) -> None:
        self._items.append((conn, since))

    def popleft(self) -> C:
        return self._items.popleft()[0]

    def take_all(self) -> list[C]:
        conns = [conn for conn, _ in self._items]
        self._items.clear()
        return conns

    def expired(self, now: float, timeout: float) -> list[C]:
        """Those held `timeout` or longer since their accept, taken out (in order)."""
        late = [conn for conn, since in self._items if now - since >= timeout]
        if late:
            self._items = deque(item for item in self._items if now - item[1] < timeout)
        return late

    def next_deadline(self, timeout: float) -> float | None:
        """When the first of them has been held `timeout` (None: none is held)."""
        return min(since for _, since in self._items) + timeout if self._items else None
