"""Greenlets reused from one job to the next: a session's run, its prelude and its relay's directions
each run as a `Task` in one of these, and a greenlet that finished its job waits for the next
instead of ending.

Why: a new gevent greenlet per job cost ~30 µs here against ~6 µs for a reused one (issue 37,
bench/results/session_account.md): the object, its first switch, and the 16 KiB frame stack
CPython 3.11 maps at a greenlet's first call and unmaps at its end. A plain session made one,
a splice session three, an HTTP request four.

A task ends as a gevent greenlet does: kill() raises GreenletExit where it waits (from the
hub, as gevent's kill does) and, unless told not to, waits until it has ended; one killed
before it began never runs. An exception other than GreenletExit is reported as gevent
reports a greenlet's (the hub's handle_error: a traceback on stderr) and kept in `exception`;
the worker goes on to its next job (an exception thrown at a waiting worker too). At most
MAX_IDLE workers wait; one more ends. The SIGUSR1 dump counts the waiting ones apart from the
live greenlets (ops/dump.py), so a leaked job still shows there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from gevent import GreenletExit, get_hub
from gevent.hub import Waiter
from greenlet import getcurrent, greenlet  # type: ignore[import-untyped]

MAX_IDLE = 64  # workers waiting for a job at most: more than the sessions that start in one loop turn

PENDING, RUNNING, DONE = "pending", "running", "done"


class Task:
    """One job in a worker: its state, its outcome (`value`, or the `exception` it raised),
    and who waits for its end."""

    __slots__ = ("fn", "args", "state", "worker", "value", "exception", "then", "waiters")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], then: Callable[[Task], None] | None) -> None:
        self.fn: Callable[..., Any] | None = fn
        self.args: tuple[Any, ...] = args
        self.state = PENDING
        self.worker: greenlet | None = None
        self.value: Any = None
        self.exception: BaseException | None = None
        self.then = then  # called from the hub once the task has ended, however it ended
        self.waiters: list[Waiter] = []

    @property
    def dead(self) -> bool:
        return self.state == DONE

    def kill(self, block: bool = True) -> None:
        """End the job: one not begun never runs; a running one gets GreenletExit where it
        waits. With `block`, return once it has ended."""
        if self.state == PENDING:
            self._ended()  # its worker skips it
            return
        if self.state == DONE:
            return
        if self.worker is getcurrent():
            raise GreenletExit  # a job that kills itself just ends
        hub = get_hub()
        hub.loop.run_callback(self._throw)
        if block:
            waiter = Waiter()
            self.waiters.append(waiter)
            waiter.get()

    def _throw(self) -> None:
        if self.state == RUNNING and self.worker is not None:  # (it may have ended meanwhile)
            self.worker.throw(GreenletExit)

    def _ended(self) -> None:
        self.state, self.fn, self.args = DONE, None, ()
        loop = get_hub().loop
        for waiter in self.waiters:
            loop.run_callback(waiter.switch, None)
        self.waiters.clear()
        if self.then is not None:
            loop.run_callback(self.then, self)


class Workers:
    """The reused workers of gsrv's loop (one set per process: see WORKERS)."""

    def __init__(self, max_idle: int = MAX_IDLE) -> None:
        self.idle: list[greenlet] = []
        self.max_idle = max_idle

    def start(self, fn: Callable[..., Any], *args: Any, then: Callable[[Task], None] | None = None) -> Task:
        """Run fn(*args) in a worker from the loop's next turn (as gevent.spawn does)."""
        task = Task(fn, args, then)
        hub = get_hub()
        worker = self.idle.pop() if self.idle else greenlet(self._serve, hub)
        task.worker = worker
        hub.loop.run_callback(worker.switch, task)
        return task

    def _serve(self, task: Task) -> None:
        hub = get_hub()
        me = getcurrent()
        while True:
            if task.state == PENDING:
                task.state = RUNNING
                try:
                    task.value = task.fn(*task.args)  # type: ignore[misc]
                except GreenletExit:
                    pass
                except BaseException as e:  # reported, as gevent reports a greenlet's
                    task.exception = e
                    hub.handle_error(me, *sys.exc_info())
                task._ended()
            del task  # (holds nothing of the last job while it waits)
            if len(self.idle) >= self.max_idle:
                return
            self.idle.append(me)
            task = self._wait(hub, me)

    def _wait(self, hub: Any, me: greenlet) -> Task:
        """The next job. Something thrown at a waiting worker (a timer its last job left armed)
        is reported, as a bug, and the worker waits on: it may have been given a job already,
        and a gevent greenlet that had ended would have ignored it."""
        while True:
            try:
                task: Task = hub.switch()
                return task
            except GreenletExit:  # the interpreter's end
                raise
            except BaseException:
                hub.handle_error(me, *sys.exc_info())


WORKERS = Workers()
