"""The Prometheus registry and gsrv's metrics (prometheus_client does the exposition).

Counters for events are bumped once per session; byte and backpressure counters are fed
from the sessions' own meters about once a second (no metric call on the per-chunk path);
state (active sessions, pauses, guard figures, listen queues) is read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector


class Meter(Protocol):
    total: int
    blocked: float
    reported: int
    reported_blocked: float


class Usage(Protocol):
    @property
    def cpu_ms(self) -> float | None: ...
    @property
    def mem_peak(self) -> int | None: ...


class Child(Protocol):
    @property
    def exit_code(self) -> int | None: ...
    @property
    def killed_by(self) -> int | None: ...
    @property
    def usage(self) -> Usage | None: ...
    @property
    def signal_name(self) -> str | None: ...


class Ended(Protocol):
    reason: str | None
    spawn_seconds: float | None

    @property
    def http_status(self) -> int | None: ...

    @property
    def child(self) -> Child | None: ...
    @property
    def duration(self) -> float: ...
    def meters(self) -> Sequence[tuple[str, Meter]]: ...


REFUSALS = ("spawn_failed", "denied", "per_ip_limit", "rate_limited", "proxy_failed", "tls_failed", "bad_request",
            "origin_denied", "host_denied", "smuggling", "head_too_large", "uri_too_long", "not_implemented",
            "method_not_allowed", "not_found", "head_timeout", "body_too_large", "unauthorized",
            "auth_limited", "auth_busy", "version_not_supported", "busy")  # fmt: skip
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)
SPAWN_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1)
CPU_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300)
MEMORY_BUCKETS = tuple(float(2**20 * n) for n in (1, 4, 16, 64, 256, 1024, 4096))


@dataclass
class ServiceState:
    """One service now: what the scrape reads, and what /services lists (`listed`)."""

    name: str
    active: int
    full: bool
    listen_queue: int | None
    pending: int = 0  # in their TLS handshake or PROXY header, or waiting for a slot after it
    detached: int = 0  # reattach: running, their client's connection gone
    max_sessions: int = 0
    paused: tuple[str, ...] = ()  # why the gate holds accept: memory, paused_by_admin, drained_by_admin, ...
    listen: str = ""
    transport: str = "tcp"
    ready: bool = True  # takes new sessions (/readyz/NAME)

    def listed(self) -> dict[str, object]:
        """As GET /services lists it."""
        return {"name": self.name, "listen": self.listen, "transport": self.transport, "sessions": self.active,
                "max_sessions": self.max_sessions, "pending": self.pending, "backlog": self.listen_queue,
                "detached": self.detached, "paused": list(self.paused), "ready": self.ready}  # fmt: skip


@dataclass
class ProcessState:
    """What the scrape reads of the whole process (from the server, the guard and the log)."""

    services: list[ServiceState]
    accept_paused: bool
    accept_pauses: int
    accept_paused_seconds: float
    guard_rss: int | None
    guard_available: int | None
    greenlets: int
    log_dropped: int
    cgroups_left: int = 0  # session cgroups the kernel would not remove (cgroup_left lines)


class Metrics:
    def __init__(self, state: Callable[[], ProcessState]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.sessions = Counter("gsrv_sessions", "Sessions ended, by reason", ["service", "reason"], registry=r)
        self.bytes = Counter("gsrv_bytes", "Bytes relayed (in: client to child)", ["service", "direction"], registry=r)
        self.duration = Histogram("gsrv_session_duration_seconds", "Session duration", ["service"],
                                  buckets=DURATION_BUCKETS, registry=r)  # fmt: skip
        self.exits = Counter("gsrv_child_exits", "Children's exits by exit code", ["service", "code"], registry=r)
        self.killed = Counter("gsrv_child_signals", "Children ended by a signal", ["service", "signal"], registry=r)
        self.spawn = Histogram("gsrv_spawn_seconds", "Time to start a command", ["service"],
                               buckets=SPAWN_BUCKETS, registry=r)  # fmt: skip
        self.session_cpu = Histogram("gsrv_session_cpu_seconds", "CPU (user + system) of a session's whole cgroup",
                                     ["service"], buckets=CPU_BUCKETS, registry=r)  # fmt: skip
        self.session_memory = Histogram("gsrv_session_memory_peak_bytes", "Peak memory of a session's cgroup",
                                        ["service"], buckets=MEMORY_BUCKETS, registry=r)  # fmt: skip
        slow = "Time pumps waited for a slow side to take bytes (in: the child, out: the client)"
        self.backpressure = Counter("gsrv_backpressure_seconds", slow, ["service", "direction"], registry=r)
        self.rwnd_limited = Counter("gsrv_tcp_rwnd_limited_seconds", "Socket handoff: time sending to the client was "
                                    "limited by its receive window (the client was slow)", ["service"],
                                    registry=r)  # fmt: skip
        self.rejected = Counter("gsrv_rejected", "Connections accepted then closed by a rule", ["service", "reason"],
                                registry=r)  # fmt: skip
        self.responses = Counter("gsrv_http_responses", "HTTP responses by status class (2xx, 4xx, ...; transport "
                                 '"http")', ["service", "status"], registry=r)  # fmt: skip
        self.upgrades = Counter("gsrv_upgrades", "gsrv upgrade, by result (ok, refused, failed)", ["result"],
                                registry=r)  # fmt: skip
        self.registry.register(_StateCollector(state))

    def upgraded(self, result: str) -> None:
        self.upgrades.labels(result).inc()

    def _counters(self) -> dict[str, Counter]:
        return {name: value for name, value in vars(self).items() if isinstance(value, Counter)}

    def handed_over(self) -> dict[str, list[list[object]]]:
        """Every counter's values by labels (an upgrade carries them: /metrics does not reset;
        the histograms start anew)."""
        return {name: [[sample.labels, sample.value] for metric in counter.collect() for sample in metric.samples
                       if sample.name.endswith("_total")]
                for name, counter in self._counters().items()}  # fmt: skip

    def take_over(self, values: dict[str, list[list[object]]]) -> None:
        counters = self._counters()
        for name, samples in values.items():
            counter = counters.get(name)
            for labels, value in samples if counter is not None else []:
                if isinstance(labels, dict) and isinstance(value, int | float) and value > 0:
                    counter.labels(**labels).inc(value)  # type: ignore[union-attr]

    def flush(self, service: str, meters: Sequence[tuple[str, Meter]]) -> None:
        """Add what each meter moved (and waited) since the last flush; a socket handoff's
        "rwnd" meter waited on the client's receive window (tcpi_rwnd_limited)."""
        for direction, meter in meters:
            moved, waited = meter.total - meter.reported, meter.blocked - meter.reported_blocked
            if moved > 0:
                self.bytes.labels(service, direction).inc(moved)
                meter.reported = meter.total
            if waited > 0:
                if direction == "rwnd":
                    self.rwnd_limited.labels(service).inc(waited)
                else:
                    self.backpressure.labels(service, direction).inc(waited)
                meter.reported_blocked = meter.blocked

    def ended(self, service: str, session: Ended) -> None:
        """Once per session, after its log line."""
        self._ending(service, session.reason or "unknown", session.duration, session.http_status)
        if session.spawn_seconds is not None:
            self.spawn.labels(service).observe(session.spawn_seconds)
        child = session.child
        if child is not None and child.exit_code is not None:
            self.exits.labels(service, str(child.exit_code)).inc()
        elif child is not None and child.signal_name is not None:
            self.killed.labels(service, child.signal_name).inc()
        usage = child.usage if child is not None else None
        if usage is not None and usage.cpu_ms is not None:
            self.session_cpu.labels(service).observe(usage.cpu_ms / 1000)
        if usage is not None and usage.mem_peak is not None:
            self.session_memory.labels(service).observe(usage.mem_peak)
        self.flush(service, session.meters())

    def refused(self, service: str, reason: str, duration: float, http_status: int | None = None) -> None:
        """Once per connection that ended without a session (the edge refused or dropped it)."""
        self._ending(service, reason, duration, http_status)

    def _ending(self, service: str, reason: str, duration: float, http_status: int | None) -> None:
        if http_status is not None:
            self.responses.labels(service, f"{http_status // 100}xx").inc()
        if reason in REFUSALS:
            self.rejected.labels(service, reason).inc()
        self.sessions.labels(service, reason).inc()
        self.duration.labels(service).observe(duration)


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], ProcessState]) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        s = self.state()
        yield _gauge("gsrv_sessions_active", "Sessions running now", [(x.name, x.active) for x in s.services])
        yield _gauge("gsrv_sessions_detached", "Sessions running without their client's connection, kept for "
                     "a reattach (counted in gsrv_sessions_active too)",
                     [(x.name, x.detached) for x in s.services])  # fmt: skip
        yield _gauge("gsrv_service_max_sessions", "The service's max_sessions (sessions at once)",
                     [(x.name, x.max_sessions) for x in s.services])  # fmt: skip
        paused = GaugeMetricFamily("gsrv_service_paused", "1 for each reason a service's accept is held now "
                                   "(memory, paused_by_admin, drained_by_admin, draining)",
                                   labels=["service", "reason"])  # fmt: skip
        for x in s.services:
            for reason in x.paused:
                paused.add_metric([x.name, reason], 1)
        yield paused
        yield _gauge(
            "gsrv_service_full", "1 while a service is at max_sessions", [(x.name, int(x.full)) for x in s.services]
        )
        yield _gauge("gsrv_pending", "Connections in their TLS handshake or PROXY header, or waiting for a slot",
                     [(x.name, x.pending) for x in s.services])  # fmt: skip
        queue = [(x.name, x.listen_queue) for x in s.services if x.listen_queue is not None]
        yield _gauge("gsrv_listen_queue", "Connections waiting in a listener's backlog", queue)
        yield GaugeMetricFamily("gsrv_accept_paused", "1 while the memory guard or a drain holds accept",
                                value=int(s.accept_paused))  # fmt: skip
        yield CounterMetricFamily(
            "gsrv_accept_pauses", "Pauses of accept by the guard or a drain", value=s.accept_pauses
        )
        yield CounterMetricFamily("gsrv_accept_paused_seconds", "Time accept was paused by the guard or a drain",
                                  value=s.accept_paused_seconds)  # fmt: skip
        if s.guard_rss is not None and s.guard_available is not None:
            yield GaugeMetricFamily("gsrv_guard_rss_bytes", "gsrv's RSS at the guard's last sample", value=s.guard_rss)
            yield GaugeMetricFamily("gsrv_guard_available_bytes", "Memory available at the guard's last sample",
                                    value=s.guard_available)  # fmt: skip
        yield GaugeMetricFamily("gsrv_greenlets", "Greenlets of sessions and of gsrv itself", value=s.greenlets)
        yield CounterMetricFamily("gsrv_log_dropped", "Log lines dropped because nobody read the log",
                                  value=s.log_dropped)  # fmt: skip
        yield CounterMetricFamily("gsrv_cgroups_left", "Session cgroups the kernel would not remove behind "
                                  "their session (cgroup_left lines; removed at gsrv's stop)",
                                  value=s.cgroups_left)  # fmt: skip


def _gauge(name: str, text: str, samples: Sequence[tuple[str, int | None]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text, labels=["service"])
    for service, value in samples:
        family.add_metric([service], value or 0)
    return family
