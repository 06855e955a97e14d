"""SIGUSR1: one look inside a running gsrv, in its log. For audits (the chaos suite checks
that greenlets, fds and children return to their baseline) and for anyone debugging a hang.

Counts are taken from the interpreter and the kernel, not from gsrv's own bookkeeping, so a
leak that the bookkeeping misses still shows: the live greenlets (found by the garbage
collector, grouped by where each is suspended), open fds, child processes.
"""

from __future__ import annotations

import gc
import os
from collections import Counter

from gevent import get_hub
from greenlet import greenlet  # type: ignore[import-untyped]

from gsrv.logs import Log
from gsrv.workers import WORKERS

TOP = 12  # the most common places greenlets wait, each on one line


def live_greenlets() -> list[greenlet]:
    """The live greenlets of gsrv's loop: its hub, the main greenlet, and all the hub runs
    but the workers waiting for a job (gsrv/workers.py: counted apart, as `idle_workers`;
    the threads of gevent's threadpool have hubs of their own, left out)."""
    hub = get_hub()
    idle = {id(g) for g in WORKERS.idle}
    found = [g for g in gc.get_objects() if isinstance(g, greenlet) and not g.dead and id(g) not in idle]
    return [g for g in found if g is hub or g is hub.parent or g.parent is hub]


def _where(g: greenlet) -> str:
    frame = g.gr_frame
    if frame is None:  # running now (the dumper itself), or not started yet
        return "running" if g is greenlet.getcurrent() else "not started"
    while frame.f_back is not None and "gevent" in frame.f_code.co_filename:
        frame = frame.f_back  # the innermost frame that is gsrv's, not gevent's own wait
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}:{frame.f_code.co_name}"


def dump(log: Log, sessions: int, pending: int, children: int) -> None:
    """Log `event=dump` with the counts, then one `event=dump_greenlets` line per place."""
    found = live_greenlets()
    places = Counter(_where(g) for g in found)
    log.info(
        "dump", greenlets=len(found), idle_workers=len(WORKERS.idle), sessions=sessions, pending=pending,
        children=children, fds=len(os.listdir("/proc/self/fd")) - 1,
    )  # fmt: skip
    for place, count in places.most_common(TOP):
        log.info("dump_greenlets", count=count, at=place)
