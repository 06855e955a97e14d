"""The memory guard in a real gsrv: thresholds hold accept until a reload relieves them (its pure
parts: tests/unit/accept/test_memory_guard.py)."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
from conftest import exchange, service_toml, wait_until

MiB = 1024 * 1024
GiB = 1024 * MiB


GUARD_FAST = '[guard]\ninterval = "100ms"\nresume_samples = 2\n'


def _reload(server, text: str) -> None:  # type: ignore[no-untyped-def]
    before = server.count_log(r"event=reloaded")
    server.config.write_text(text)
    server.signal(signal.SIGHUP)
    wait_until(lambda: server.count_log(r"event=reloaded") > before, 10, "the reload")


@pytest.mark.timeout(60)
def test_rss_over_max_rss_holds_clients_in_the_backlog_until_reload(gsrv) -> None:
    text = GUARD_FAST + 'max_rss = "1MiB"\n' + service_toml("echo", ["cat"])
    server = gsrv(text)
    server.wait_log(r"event=accept_paused reason=rss rss=\S+ max_rss=1MiB")
    server.wait_log(r"event=state state=paused")
    clients = [server.connect("echo", timeout=20) for _ in range(5)]  # the handshake succeeds
    end = time.monotonic() + 3
    while time.monotonic() < end:
        assert not server.children(), "a child started while accept was paused"
        time.sleep(0.05)
    _reload(server, text.replace('max_rss = "1MiB"', 'max_rss = "4GiB"'))
    server.wait_log(r"event=accept_resumed paused_s=")
    replies = {}
    threads = [threading.Thread(target=lambda i=i, c=c: replies.update({i: exchange(c, b"payload %d" % i)}))
               for i, c in enumerate(clients)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert replies == {i: b"payload %d" % i for i in range(5)}
    for c in clients:
        c.close()


@pytest.mark.timeout(60)
def test_min_available_above_real_available_memory_pauses(gsrv) -> None:
    text = GUARD_FAST + 'min_available = "100000GiB"\n' + service_toml("echo", ["cat"])
    server = gsrv(text)
    server.wait_log(r"event=accept_paused reason=available available=\S+ min_available=100000GiB")
    with server.connect("echo", timeout=20) as sock:
        time.sleep(0.5)
        assert not server.children()
        _reload(server, text.replace("100000GiB", "1MiB"))
        assert exchange(sock, b"through") == b"through"
    server.wait_log(r"event=accept_resumed")


@pytest.mark.timeout(60)
def test_pressure_mid_transfer_then_ended_sessions_do_not_reopen_accept(gsrv) -> None:
    text = GUARD_FAST + service_toml("echo", ["cat"])
    server = gsrv(text)
    running = server.connect("echo")
    running.sendall(b"first half ")
    assert running.recv(100) == b"first half "
    _reload(server, text.replace("resume_samples = 2\n", 'resume_samples = 2\nmax_rss = "1MiB"\n'))
    server.wait_log(r"event=accept_paused reason=rss")
    waiting = server.connect("echo", timeout=20)  # sits in the backlog
    assert exchange(running, b"second half") == b"second half"  # the running session completes
    running.close()
    server.wait_log(r"event=session_end service=echo .*reason=eof")
    wait_until(lambda: not server.children(), 5, "the first child to be reaped")
    end = time.monotonic() + 1.5
    while time.monotonic() < end:  # a session ended while paused: accept stays closed
        assert not server.children(), "a session ending while paused reopened accept"
        time.sleep(0.05)
    _reload(server, text)
    assert exchange(waiting, b"late") == b"late"
    waiting.close()


@pytest.mark.timeout(60)
def test_paused_and_idle_gsrv_keeps_running_and_stops_at_once(gsrv) -> None:
    server = gsrv('[server]\ndrain_timeout = "60s"\nkill_grace = "1s"\n' + GUARD_FAST + 'max_rss = "1MiB"\n'
                  + service_toml("echo", ["cat"]))  # fmt: skip
    server.wait_log(r"event=accept_paused")
    time.sleep(2)
    assert server.proc.poll() is None, "gsrv exited while paused with nothing to do"
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0
    assert time.monotonic() - started < 30  # at once: no session to wait for, not the 60 s drain_timeout
    server.close()
    with pytest.raises(OSError):
        socket.create_connection(server.address("echo"), timeout=2).close()
