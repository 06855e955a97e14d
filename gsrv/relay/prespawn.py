"""Children started ahead (`prespawn = N`): a service keeps up to N children already started,
in their cgroups, each waiting on its stdin for the one session it will serve; a session
takes one and another is started behind it.

Such a child started before its client connected: its environment has no client address
(`peer_line = "proxy-v1"` gives it one on stdin). The pool refills only while its service
accepts (the memory guard's pause and a drain stop it); a reload that changes anything of
the launch retires the waiting children; one that dies while waiting is replaced and counted,
after a backoff when it died young.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import gevent

from gsrv.config.parse import ServiceConfig
from gsrv.edge.arrival import build_env
from gsrv.errors import SpawnError
from gsrv.logs import Log
from gsrv.relay.child import Child, Launcher
from gsrv.relay.stdio import Stdio

YOUNG_S = 1.0  # a child that dies sooner after its start is replaced after a backoff
BACKOFF_S = 1.0  # doubling up to BACKOFF_MAX_S, back to none after a child that lived
BACKOFF_MAX_S = 30.0


def launch_of(svc: ServiceConfig) -> tuple[object, ...]:
    """What a waiting child was started with: a reload that changes any of it retires them."""
    return (svc.launch, svc.env, svc.pass_env, svc.stderr)  # the launch: its cwd, pipes, containment, pty too


class Prespawned:
    """One service's children started ahead. `may_fill` says whether its service accepts now."""

    def __init__(self, svc: ServiceConfig, launcher: Launcher, log: Log, kill_grace: float,
                 may_fill: Callable[[], bool]) -> None:  # fmt: skip
        self.svc = svc
        self.launcher = launcher
        self.log = log
        self.kill_grace = kill_grace
        self.may_fill = may_fill
        self.waiting: deque[tuple[Child, float]] = deque()  # started, with when
        self.starting = 0
        self.died = 0  # waiting children that ended before a session took them
        self._backoff = 0.0
        self._filler: gevent.Greenlet | None = None
        self._retired = False
        self.stopping: set[gevent.Greenlet] = set()  # ladders of children no session took

    @property
    def wanted(self) -> int:
        return 0 if self._retired else self.svc.interact.prespawn

    def take(self) -> Child | None:
        """A waiting child, still running, for a session; another is started behind it."""
        child = None
        while self.waiting:
            candidate, _ = self.waiting.popleft()
            if not candidate.exited.is_set():
                child = candidate
                break
            self._stop(candidate)  # it ended in this turn of the loop, before _ended heard of it
        self.fill()
        return child

    def fill(self) -> None:
        """Start children until `wanted` wait (in a greenlet of its own: the start waits for the spawner)."""
        if self._filler is None and len(self.waiting) + self.starting < self.wanted and self.may_fill():
            self._filler = gevent.spawn(self._fill)

    def _fill(self) -> None:
        try:
            while len(self.waiting) + self.starting < self.wanted and self.may_fill():
                if self._backoff:
                    gevent.sleep(self._backoff)
                    if not (len(self.waiting) < self.wanted and self.may_fill()):
                        break
                self._start_one()
        finally:
            self._filler = None

    def _start_one(self) -> None:
        svc = self.svc
        extra = {
            "GSRV_SERVICE": svc.name,
            "GSRV_PRESPAWN": "1",
            "PROTO": "UNIX" if svc.listen.kind == "unix" else "TCP",
        }
        self.starting += 1
        try:
            stdio = Stdio.pipes(svc.stderr)
            child = self.launcher.spawn(svc.launch, build_env(svc, extra), stdio)
            child.started()
        except SpawnError as e:
            self._backoff = min(max(self._backoff * 2, BACKOFF_S), BACKOFF_MAX_S)
            self.log.warning("prespawn_failed", service=svc.name, error=str(e), next=f"again in {self._backoff:g}s")
            return
        finally:
            self.starting -= 1
        started = time.monotonic()
        if self._retired or launch_of(svc) != launch_of(self.svc):  # retired while it started
            self._stop(child)
            return
        self.waiting.append((child, started))
        child.exited.rawlink(lambda _: self._ended(child, started))

    def _ended(self, child: Child, started: float) -> None:
        """A waiting child ended before any session took it: counted, stopped, replaced."""
        entry = (child, started)
        if entry not in self.waiting:
            return  # a session has it (or it was retired)
        self.waiting.remove(entry)
        self.died += 1
        lived = time.monotonic() - started
        young = lived < YOUNG_S
        self._backoff = min(max(self._backoff * 2, BACKOFF_S), BACKOFF_MAX_S) if young else 0.0
        self.log.warning("prespawn_died", service=self.svc.name, pid=child.pid, exit=child.exit_code,
                         signal=child.signal_name, lived_s=round(lived, 2),
                         next=f"a new one in {self._backoff:g}s")  # fmt: skip
        self._stop(child)
        self.fill()

    def _stop(self, child: Child) -> None:
        """In a greenlet of its own, counted in `stopping` (a drain waits for them)."""
        greenlet = gevent.spawn(child.stop, self.kill_grace, lambda _: None)
        self.stopping.add(greenlet)
        greenlet.link(self.stopping.discard)

    def configure(self, svc: ServiceConfig, kill_grace: float) -> None:
        """A reload: a changed launch retires the waiting children; a new count trims or fills."""
        changed = launch_of(svc) != launch_of(self.svc)
        self.svc, self.kill_grace = svc, kill_grace
        if changed:
            self._end_waiting("reload")
        while len(self.waiting) > self.wanted:
            child, _ = self.waiting.pop()
            self._stop(child)
        self.fill()

    def retire(self, why: str) -> None:
        """A drain or a removed service: the waiting children end, none is started again."""
        self._retired = True  # the filler stops, and stops the child it may be starting
        self._end_waiting(why)

    def _end_waiting(self, why: str) -> None:
        if self.waiting:
            self.log.info("prespawn_retired", service=self.svc.name, children=len(self.waiting), why=why)
        while self.waiting:
            child, _ = self.waiting.popleft()
            self._stop(child)
