"""Chaos scenarios 2 and 3: every kind of misbehaviour at once, then the audit."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import audit
import mix
import pytest
from conftest import Gsrv

SECONDS = float(os.environ.get("GSRV_CHAOS_SECONDS", "20"))  # longer by hand


@pytest.mark.timeout(SECONDS + 150)
def test_the_mix_loses_nothing_and_leaves_nothing_behind(gsrv: Callable[..., Gsrv], tmp_path: Path) -> None:
    mix.prepare(tmp_path)
    server = gsrv(mix.services_toml())
    base = audit.snapshot(server)
    outcomes = mix.run(server.address, SECONDS)
    audit.wait_quiet(server, len(outcomes))
    reasons = audit.account(server, outcomes)
    assert {o.service for o in outcomes} == set(mix.SERVICES), "every kind ran"
    for reason in ("eof", "client_reset", "session_timeout", "tls_failed", "proxy_failed", "idle_timeout"):
        assert reasons[reason], reasons
    assert server.count_log(r"event=kill_escalated") >= reasons["session_timeout"]  # the TERM-ignoring ones
    audit.settle(server, base)
    audit.no_leftovers(server, audit.rss_bound(base))


def _config(max_sessions: int, pressure: bool) -> str:
    server = '[server]\nkill_grace = "1s"\ndrain_timeout = "2s"\n'
    guard = '[guard]\ninterval = "100ms"\n' + ('max_rss = "1MiB"\n' if pressure else "")
    return server + guard + mix.services_toml(max_sessions=max_sessions)


def _held(address: tuple[str, int]) -> mix.Outcome:
    """A slow download that reads until gsrv ends it."""
    with socket.create_connection(address, timeout=30) as sock:
        port = sock.getsockname()[1]
        got, exact = 0, True
        with contextlib.suppress(OSError):
            while chunk := sock.recv(mix.SLOW_RATE // 10):
                exact = exact and chunk.count(0) == len(chunk)
                got += len(chunk)
                time.sleep(0.1)
    return mix.Outcome("slow", port, exact, f"held: {got} bytes")


@pytest.mark.timeout(SECONDS + 150)
def test_the_mix_under_reloads_and_guard_pauses_then_a_drain(gsrv: Callable[..., Gsrv], tmp_path: Path) -> None:
    mix.prepare(tmp_path)
    server = gsrv(_config(64, False))
    base = audit.snapshot(server)
    peak = [base.rss]
    stop = threading.Event()

    sent = [0]

    def reloader() -> None:  # limits change every second, the guard's pressure every two
        n = 0
        while not stop.wait(1.0):
            n += 1
            sent[0] = n
            server.config.write_text(_config(4 if n % 2 else 64, pressure=n % 4 in (1, 2)))
            server.signal(signal.SIGHUP)
            peak[0] = max(peak[0], server.rss())

    changer = threading.Thread(target=reloader, daemon=True)
    changer.start()
    outcomes: list[mix.Outcome] = []
    runner = threading.Thread(target=lambda: outcomes.extend(mix.run(server.address, SECONDS)), daemon=True)
    runner.start()
    time.sleep(SECONDS - 2)
    stop.set()
    changer.join(10)
    mark = len(server.lines)
    server.config.write_text(_config(64, pressure=False))  # the last reload: open, no pressure
    server.signal(signal.SIGHUP)
    server.wait_log(r"event=reloaded", start=mark)
    time.sleep(0.5)  # the guard's relief takes three samples
    held = [threading.Thread(target=lambda: outcomes.append(_held(server.address("slow")))) for _ in range(3)]
    for t in held:  # three downloads that outlast the drain: they must end as "shutdown"
        t.start()
    time.sleep(1.5)
    server.signal(signal.SIGTERM)  # with sessions in flight: drain_timeout 2s, then shutdown
    assert server.wait(timeout=60) == 0
    runner.join(120)
    for t in held:
        t.join(30)
    server.close()
    reasons = audit.account(server, outcomes, also=("shutdown",))
    # every SIGHUP gsrv saw was a reload (two sent close together may arrive as one: signals coalesce)
    reloads = server.count_log(r"event=reloaded")
    assert reloads == server.count_log(r"event=signal signal=SIGHUP") and reloads >= 2 and sent[0] >= 1
    assert server.count_log(r"event=accept_paused reason=rss") >= 2  # the guard really paused
    assert reasons["eof"] and reasons["shutdown"] >= 3, reasons
    assert server.count_log(r"event=state state=stopped") == 1
    audit.no_leftovers(server, audit.rss_bound(base), running=False)
    assert peak[0] < audit.rss_bound(base)
