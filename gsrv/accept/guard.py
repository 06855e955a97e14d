"""The memory guard: samples gsrv's RSS and the memory available to it, and says when
pressure starts and ends (with hysteresis). It knows nothing of servers: the composer
wires on_pressure/on_relief to the gates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from gsrv.accept.memlimit import discover
from gsrv.config.parse import GuardConfig
from gsrv.config.units import format_size
from gsrv.logs import Log
from gsrv.periodic import Periodic

REMIND_S = 30.0


@dataclass(frozen=True)
class Sample:
    rss: int
    available: int
    total: int
    at: float


class Sampler:
    """One reading: own RSS (8 µs), virtual_memory (~40 µs), the cgroup's files. Never
    walks children."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.cgroup = discover()

    def sample(self) -> Sample:
        rss = int(self.process.memory_info().rss)
        vm = psutil.virtual_memory()
        available, total = int(vm.available), int(vm.total)
        if self.cgroup is not None:
            room, limit = self.cgroup.headroom()
            if room is not None and limit is not None:
                available, total = min(available, room), min(total, limit)
        return Sample(rss, available, total, time.monotonic())


class Pressure:
    """The hysteresis, pure: feed samples, hear "pause" or "resume"."""

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.reason: str | None = None
        self.good = 0  # consecutive samples below both resume values

    def update(self, s: Sample) -> str | None:
        cfg = self.cfg
        if self.reason is None:
            if s.rss >= cfg.max_rss:
                self.reason = "rss"
            elif s.available < cfg.min_available.of(s.total):
                self.reason = "available"
            return "pause" if self.reason else None
        calm = s.rss < cfg.resume_rss and s.available >= cfg.resume_available.of(s.total)
        self.good = self.good + 1 if calm else 0
        if self.good >= cfg.resume_samples:
            self.reason, self.good = None, 0
            return "resume"
        return None

    def figures(self, s: Sample) -> dict[str, str]:
        if self.reason == "rss":
            return {"rss": format_size(s.rss), "max_rss": format_size(self.cfg.max_rss)}
        return {"available": format_size(s.available), "min_available": format_size(self.cfg.min_available.of(s.total))}


class Guard:
    """One greenlet sampling every `interval`; one log line per transition, a reminder every 30 s."""

    def __init__(
        self,
        cfg: GuardConfig,
        sampler: Sampler,
        on_pressure: Callable[[str, Sample], None],
        on_relief: Callable[[Sample], None],
        log: Log,
    ) -> None:
        self.cfg = cfg
        self.sampler = sampler
        self.on_pressure, self.on_relief = on_pressure, on_relief
        self.log = log
        self.pressure = Pressure(cfg)
        self.last: Sample | None = None
        self.pauses = 0
        self._paused_since: float | None = None
        self._paused_before = 0.0
        self._reminded = 0.0
        self._ticker = Periodic(self._tick, lambda: self.cfg.interval)

    @property
    def paused(self) -> bool:
        return self.pressure.reason is not None

    def paused_seconds(self) -> float:
        """Total time accept was paused by the guard, the current pause included."""
        current = time.monotonic() - self._paused_since if self._paused_since is not None else 0.0
        return self._paused_before + current

    def configure(self, cfg: GuardConfig) -> None:
        """New thresholds apply from the next sample on; a pause in progress stays until relief."""
        self.cfg = cfg
        self.pressure.cfg = cfg

    def check(self) -> None:
        s = self.last = self.sampler.sample()
        action = self.pressure.update(s)
        if action == "pause":
            self.pauses += 1
            self._paused_since = self._reminded = s.at
            resume = f"rss < {format_size(self.cfg.resume_rss)} and available >= {self.cfg.resume_available}"
            self.log.warning(
                "accept_paused", reason=self.pressure.reason, **self.pressure.figures(s),
                next=f"resume after {self.cfg.resume_samples} samples with {resume}",
            )  # fmt: skip
            self.on_pressure(self.pressure.reason or "", s)
        elif action == "resume":
            paused_s = s.at - (self._paused_since or s.at)
            self._paused_before += paused_s
            self._paused_since = None
            self.log.info("accept_resumed", paused_s=round(paused_s, 1), rss=format_size(s.rss),
                          available=format_size(s.available))  # fmt: skip
            self.on_relief(s)
        elif self.paused and s.at - self._reminded >= REMIND_S:
            self._reminded = s.at
            paused_s = round(s.at - (self._paused_since or s.at), 1)
            self.log.warning("accept_still_paused", reason=self.pressure.reason, paused_s=paused_s,
                             **self.pressure.figures(s))  # fmt: skip

    def start(self) -> None:
        self._ticker.start()

    def stop(self) -> None:
        self._ticker.stop()

    def _tick(self) -> None:
        try:
            self.check()
        except Exception as e:  # a failed reading must not end the guard
            self.log.error("guard_sample_failed", error=f"{type(e).__name__}: {e}", next="retry next interval")
