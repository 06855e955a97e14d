"""The admin endpoint of a real gsrv: /metrics parsed with prometheus_client, /readyz."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import exchange, log_time, service_toml, wait_until
from prometheus_client.parser import text_string_to_metric_families

ADMIN = '[admin]\nlisten = "127.0.0.1:0"\n'


def _admin(server) -> str:  # type: ignore[no-untyped-def]
    line = server.wait_log(r"event=admin_listening address=\S+")
    return "http://" + line.split("address=")[1].split()[0]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = _get(base + "/metrics")
    assert status == 200
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _three_into_wc(server) -> bytes:  # type: ignore[no-untyped-def]
    """1000, 2000 and 3000 bytes into the "wc" service, one session each: wc's replies."""
    replies = b""
    for size in (1000, 2000, 3000):
        with server.connect("wc") as sock:
            replies += exchange(sock, b"x" * size)
    assert replies.split() == [b"1000", b"2000", b"3000"]
    return replies


@pytest.mark.timeout(60)
def test_metrics_count_exact_bytes_sessions_and_exits(gsrv) -> None:
    text = ADMIN + service_toml("wc", ["wc", "-c"]) + service_toml("three", ["sh", "-c", "cat >/dev/null; exit 3"])
    text += service_toml("killed", ["sh", "-c", "kill -KILL $$"])
    server = gsrv(text)
    base = _admin(server)
    replies = _three_into_wc(server)
    with server.connect("three") as sock:
        exchange(sock, b"y" * 500)
    with server.connect("killed") as sock, contextlib.suppress(ConnectionResetError):
        exchange(sock, b"")
    wait_until(lambda: server.count_log("event=session_end") == 5, 10, "5 session_end lines")
    m = _samples(base)
    assert _value(m, "gsrv_bytes_total", service="wc", direction="in") == 6000
    assert _value(m, "gsrv_bytes_total", service="wc", direction="out") == len(replies)
    assert _value(m, "gsrv_bytes_total", service="three", direction="in") == 500
    assert _value(m, "gsrv_sessions_total", service="wc", reason="eof") == 3
    assert _value(m, "gsrv_sessions_total", service="three", reason="eof") == 1
    assert _value(m, "gsrv_child_exits_total", service="wc", code="0") == 3
    assert _value(m, "gsrv_child_exits_total", service="three", code="3") == 1
    assert _value(m, "gsrv_child_signals_total", service="killed", signal="KILL") == 1
    assert _value(m, "gsrv_session_duration_seconds_count", service="wc") == 3
    assert _value(m, "gsrv_spawn_seconds_count", service="wc") == 3
    assert _value(m, "gsrv_sessions_active", service="wc") == 0
    assert _value(m, "gsrv_accept_paused") == 0
    assert _value(m, "process_resident_memory_bytes") > 0
    assert _get(base + "/healthz") == (200, "ok\n")
    assert _get(base + "/readyz") == (200, "ready\n")


@pytest.mark.timeout(60)
def test_byte_counter_moves_during_a_long_upload(gsrv) -> None:
    server = gsrv(ADMIN + service_toml("sink", ["sh", "-c", "cat >/dev/null"]))
    base = _admin(server)
    stop = threading.Event()

    def upload(sock: socket.socket) -> None:
        while not stop.is_set():
            sock.sendall(b"z" * 65536)
            time.sleep(0.01)
        sock.shutdown(socket.SHUT_WR)

    with server.connect("sink") as sock:
        uploader = threading.Thread(target=upload, args=(sock,))
        uploader.start()
        time.sleep(1.5)
        first = _value(_samples(base), "gsrv_bytes_total", service="sink", direction="in")
        time.sleep(2.5)
        second = _value(_samples(base), "gsrv_bytes_total", service="sink", direction="in")
        assert server.count_log("event=session_end") == 0  # still running
        stop.set()
        uploader.join(timeout=10)
        sock.recv(10)
    assert 0 < first < second


@pytest.mark.timeout(60)
def test_readyz_follows_the_guard_and_the_drain(gsrv) -> None:
    fast = '[guard]\ninterval = "100ms"\nresume_samples = 2\n'
    text = fast + ADMIN + service_toml("echo", ["cat"])
    server = gsrv(text)
    base = _admin(server)
    assert _get(base + "/readyz") == (200, "ready\n")
    server.config.write_text(text.replace("resume_samples = 2\n", 'resume_samples = 2\nmax_rss = "1MiB"\n'))
    server.signal(signal.SIGHUP)
    wait_until(lambda: _get(base + "/readyz")[0] == 503, 10, "/readyz to say 503")
    assert _get(base + "/readyz") == (503, "not ready: accept paused by the memory guard\n")
    assert _value(_samples(base), "gsrv_accept_paused") == 1
    server.config.write_text(text)
    server.signal(signal.SIGHUP)
    wait_until(lambda: _get(base + "/readyz")[0] == 200, 10, "/readyz to say 200 again")
    m = _samples(base)
    assert _value(m, "gsrv_accept_paused") == 0 and _value(m, "gsrv_accept_pauses_total") == 1
    with server.connect("echo") as sock:  # a session keeps the drain going
        sock.sendall(b"hold")
        assert sock.recv(10) == b"hold"
        server.signal(signal.SIGTERM)
        wait_until(lambda: _get(base + "/readyz") == (503, "not ready: draining\n"), 10, "503 while draining")
        assert exchange(sock, b"") == b""


ANNOUNCE = '[server]\nkill_grace = "1s"\ndrain_announce = "5s"\n'


@pytest.mark.timeout(60)
def test_an_announced_stop_fails_readiness_keeps_accepting_reloads_then_drains(gsrv) -> None:
    text = ANNOUNCE + ADMIN + service_toml("echo", ["cat"])
    server = gsrv(text)
    base = _admin(server)
    address = server.address("echo")
    held = socket.create_connection(address, timeout=10)  # keeps the drain going once it begins
    held.sendall(b"hold")
    assert held.recv(10) == b"hold"
    server.signal(signal.SIGTERM)
    announced = server.wait_log(r"event=announcing ")
    assert "sessions=1 drain_announce_s=5" in announced and "next=drain" in announced
    assert _get(base + "/readyz") == (503, "not ready: draining\n")
    assert _value(_samples(base), "gsrv_accept_paused") == 0, "a balancer sees the 503; clients are still taken"
    with socket.create_connection(address, timeout=10) as sock:
        assert exchange(sock, b"still served") == b"still served"
    # a SIGHUP during the announcement reloads: a service it adds listens and serves
    server.config.write_text(text + service_toml("upper", ["tr", "a-z", "A-Z"]))
    server.signal(signal.SIGHUP)
    line = server.wait_log(r"event=listening service=upper address=\S+")
    upper_host, upper_port = line.split("address=")[1].split()[0].rsplit(":", 1)
    upper = (upper_host, int(upper_port))
    with socket.create_connection(upper, timeout=10) as sock:
        assert exchange(sock, b"abc") == b"ABC"
    draining = server.wait_log(r"event=draining ", timeout=15)
    assert log_time(draining) - log_time(announced) >= 4.99, "the drain began before drain_announce was over"
    served = [line for line in server.lines if "event=session_end" in line]
    assert len(served) == 2 and all(log_time(line) < log_time(draining) for line in served), served
    for closed in (address, upper):  # the drain closes every listener, the one the reload added too
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(closed, timeout=5).close()
    assert exchange(held, b" on") == b" on", "the session running through it all finishes"
    held.close()
    assert server.wait(timeout=20) == 0
    states = [m.group(1) for m in map(re.compile(r"event=state state=(\w+)").search, server.lines) if m]
    assert states == ["serving", "announcing", "draining", "stopped"]


@pytest.mark.timeout(60)
def test_a_second_sigterm_ends_an_announcement_at_once(gsrv) -> None:
    server = gsrv(ANNOUNCE.replace('"5s"', '"60s"') + ADMIN + service_toml("echo", ["cat"]))
    with server.connect("echo") as sock:
        sock.sendall(b"hold")
        assert sock.recv(10) == b"hold"
        server.signal(signal.SIGTERM)
        server.wait_log(r"event=announcing sessions=1 ")
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
        assert time.monotonic() - started < 10, "the second signal waited for the announcement or the drain"
    assert server.count_log(r"event=session_end .*reason=shutdown") == 1


@pytest.mark.timeout(60)
def test_listen_queue_shows_clients_waiting_behind_a_full_service(gsrv) -> None:
    server = gsrv(ADMIN + service_toml("one", ["cat"], max_sessions=1))
    base = _admin(server)
    holder = server.connect("one")
    holder.sendall(b"x")
    assert holder.recv(10) == b"x"
    waiting = [server.connect("one") for _ in range(50)]

    def queued() -> bool:
        m = _samples(base)
        return (
            _value(m, "gsrv_listen_queue", service="one") == 50 and _value(m, "gsrv_service_full", service="one") == 1
        )

    wait_until(queued, 10, "gsrv_listen_queue == 50 and gsrv_service_full == 1")
    assert _get(base + "/readyz")[0] == 200  # a full service is not a reason to leave rotation
    for sock in [holder, *waiting]:
        sock.close()


@pytest.mark.timeout(60)
def test_socket_handoff_counts_the_kernels_bytes_and_a_slow_clients_window(gsrv) -> None:
    text = ADMIN + service_toml("wc", ["wc", "-c"], relay="socket")
    text += service_toml("big", ["head", "-c", str(32 * 1024 * 1024), "/dev/zero"], relay="socket")
    server = gsrv(text)
    base = _admin(server)
    replies = _three_into_wc(server)
    with server.connect("big") as sock:  # a client that reads nothing for 4 s: its window closes
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.shutdown(socket.SHUT_WR)
        time.sleep(4)
        received = 0
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    assert received == 32 * 1024 * 1024
    wait_until(lambda: server.count_log("event=session_end") == 4, 10, "4 session_end lines")
    m = _samples(base)
    assert _value(m, "gsrv_bytes_total", service="wc", direction="in") == 6000
    assert _value(m, "gsrv_bytes_total", service="wc", direction="out") == len(replies)
    assert _value(m, "gsrv_bytes_total", service="big", direction="out") == 32 * 1024 * 1024
    assert (
        _value(m, "gsrv_tcp_rwnd_limited_seconds_total", service="big") > 1.0
    )  # of the 4 s it did not read (a slow start has 3 s)
    assert _value(m, "gsrv_tcp_rwnd_limited_seconds_total", service="wc") == 0
    assert _value(m, "gsrv_backpressure_seconds_total", service="big", direction="out") == 0  # no pump waited


@pytest.mark.timeout(90)
def test_a_kept_alive_connections_next_request_dropped_by_a_drain_adds_no_response(gsrv) -> None:
    cgi = ["sh", "-c", 'case "$PATH_INFO" in /slow) sleep 60;; esac; printf "Content-Type: text/plain\\n\\nok"']
    text = ADMIN + '[server]\ndrain_timeout = "30s"\nkill_grace = "1s"\n' + service_toml("web", cgi, transport="http",
                                                                                           max_sessions=1)  # fmt: skip
    server = gsrv(text)
    base = _admin(server)
    kept, slow = server.connect("web"), server.connect("web")
    kept.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    reply = b""
    while not reply.endswith(b"ok\r\n0\r\n\r\n") and not reply.endswith(b"ok"):
        reply += kept.recv(4096)
    slow.sendall(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # takes the one slot
    wait_until(lambda: _value(_samples(base), "gsrv_sessions_active", service="web") == 1, 10, "the slow one")
    kept.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # waits for the slot, unread
    server.signal(signal.SIGTERM)  # the drain drops the waiting request, answered by no status
    wait_until(lambda: server.count_log(r"service=web .*reason=shutdown") == 1, 10, "the waiting request's end")
    assert _value(_samples(base), "gsrv_http_responses_total", service="web", status="2xx") == 1
    kept.close()
    slow.close()
