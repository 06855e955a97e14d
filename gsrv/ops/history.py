"""The last 15 minutes of a few counters, for the status page's plots: every SAMPLE_S the
totals of the metrics registry's own families (sessions ended, bytes each way, backpressure
seconds, refusals by reason), kept in a ring; the page draws their rates.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry

SAMPLE_S = 2.0
KEPT = 450  # 15 minutes of samples
# the counters the plots read, and the series each feeds
PLOTTED = {"gsrv_sessions_total": "sessions", "gsrv_bytes_total": "bytes", "gsrv_backpressure_seconds_total": "blocked",
           "gsrv_rejected_total": "refused"}  # fmt: skip


def totals(registry: CollectorRegistry) -> dict[str, float]:
    """The registry's counters now, summed over services: "sessions", "bytes_in", "bytes_out",
    "blocked_in", "blocked_out", and "refused:REASON" for each refusal reason."""
    found: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            kind = PLOTTED.get(sample.name)
            if kind is None:
                continue
            if kind in ("bytes", "blocked"):
                kind = f"{kind}_{sample.labels.get('direction', '')}"
            elif kind == "refused":
                kind = f"refused:{sample.labels.get('reason', '')}"
            found[kind] = found.get(kind, 0.0) + sample.value
    return found


class History:
    """Samples of `totals`, oldest first: (Unix time, totals)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=KEPT)

    def sample(self) -> None:
        self.samples.append((round(time.time(), 3), totals(self.registry)))

    def series(self) -> list[dict[str, object]]:
        return [{"t": t, **values} for t, values in self.samples]
