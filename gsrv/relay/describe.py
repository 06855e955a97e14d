"""A running session as the operator's view lists it (`GET /sessions` on the admin listener):
read when asked from what the session already keeps (its meters, its child, its connection),
so a session costs nothing between askings. What it waits on is decided by `waiting`, a pure
function of those facts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

from gsrv.relay.pump import queued
from gsrv.relay.session import Session

FLOWING_S = 1.0  # a byte either way within this long: flowing; else idle
STATES = ("flowing", "client", "child", "idle", "detached")  # what a session waits on
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
Fields = dict[str, object]


def waiting(detached: bool, output_pending: bool, input_pending: bool, last: float | None, now: float) -> str:
    """ "client": output the client has not taken yet waits (held by gsrv, or in the child's
    stdout pipe on the splice path: a slow reader); "child": input the child has not read waits
    (backpressure); "flowing": bytes moved within FLOWING_S; "idle": none did (or none yet); "detached": a
    terminal session waiting for its page (reattach)."""
    if detached:
        return "detached"
    if output_pending:
        return "client"
    if input_pending:
        return "child"
    return "flowing" if last is not None and now - last < FLOWING_S else "idle"


def described(sessions: Sequence[Session]) -> Iterator[Fields]:
    """Each session described, in order, as the caller asks for the next (one that ended
    meanwhile left out)."""
    for session in sessions:
        if session.reason is None:
            yield describe(session, time.monotonic())


def describe(session: Session, now: float) -> Fields:
    """One session, now."""
    relay, child = session.relay, session.child
    meters = dict(relay.meters()) if relay is not None else {}
    inbound, outbound = meters.get("in"), meters.get("out")
    moved = bool(inbound and inbound.total) or bool(outbound and outbound.total)
    last = relay.last_activity() if relay is not None and moved else None  # None: no byte yet
    detached = relay is not None and relay.detached_since is not None
    output_pending = bool(outbound and outbound.holding) or (
        relay is not None and child is not None and child.stdout >= 0 and relay.output_in_flight(child.stdout)
    )
    input_pending = bool(inbound and inbound.holding) or (child is not None and child.stdin >= 0
                                                          and queued(child.stdin) > 0)  # fmt: skip
    fields: Fields = {
        "id": session.sid,
        "service": session.svc.name,
        **session.visit.log_fields(),
        "transport": session.svc.interact.transport,
        "relay": relay.name if relay is not None else None,
        "started": round(time.time() - session.duration, 3),
        "age_s": round(session.duration, 3),
        "bytes_in": inbound.total if inbound else 0,
        "bytes_out": outbound.total if outbound else 0,
        "waiting": waiting(detached, output_pending, input_pending, last, now),
        "idle_s": round(max(now - last, 0.0) if last is not None else session.duration, 3),
        "pid": child.pid if child is not None else None,
    }
    if child is not None:
        fields |= usage(child.kill_scope.now(), child.pid)
    return fields


def usage(cgroup: tuple[float | None, int | None], pid: int) -> Fields:
    """CPU seconds and memory: the session's cgroup (its whole tree) where it has accounting,
    else the child's own /proc/PID/stat (`usage_of`: "child")."""
    cpu_ms, memory = cgroup
    if cpu_ms is not None or memory is not None:
        return {"cpu_s": None if cpu_ms is None else round(cpu_ms / 1000, 3), "memory": memory, "usage_of": "cgroup"}
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            stat = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return {"cpu_s": None, "memory": None, "usage_of": None}
    fields = stat[stat.rindex(b")") + 2 :].split()  # after the command's name, which may hold spaces
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (the 14th and 15th of stat)
    return {"cpu_s": round(ticks / _TICK, 3), "memory": int(fields[21]) * _PAGE, "usage_of": "child"}
