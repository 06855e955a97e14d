"""The busy answer (queue_timeout, queue_max, busy_on_pause): a full service holds a client it
accepted up to queue_timeout, then says so after the client's prelude, on every transport; with
the keys absent the backlog holds clients, unanswered, and serves them all."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import service_toml, service_with, tls_files, wait_until
from test_hostile import close_code, upgrade

CLIENTS = 40
SLOTS = 2
QUEUE = {"max_sessions": SLOTS, "queue_timeout": "1s", "queue_max": 38}
CGI = ["sh", "-c", "sleep 5; printf 'Content-Type: text/plain\\n\\nserved'"]


def raw(address: tuple[str, int], context: ssl.SSLContext | None = None) -> tuple[float, bytes]:
    """A raw TCP client (TLS with `context`): seconds from before its connect (so before gsrv's
    accept) to gsrv's answer, and the answer."""
    started = time.monotonic()
    sock: socket.socket = socket.create_connection(address, timeout=60)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    with sock:
        got = b""
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except (ConnectionResetError, ssl.SSLError):
            got += b"<reset>"
    return time.monotonic() - started, got


def http(address: tuple[str, int]) -> tuple[float, bytes]:
    started = time.monotonic()
    with socket.create_connection(address, timeout=60) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
    return time.monotonic() - started, got


def websocket(address: tuple[str, int]) -> tuple[float, bytes]:
    started = time.monotonic()
    sock, head = upgrade(address)
    with sock:
        assert head.startswith(b"HTTP/1.1 101 "), head
        code = close_code(sock)
    return time.monotonic() - started, b"close %d" % (code or 0)


def ends(server, name: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [line for line in server.lines if re.search(rf"event=session_end service={name} ", line)]


@pytest.mark.timeout(120)
def test_a_full_service_gives_each_held_client_its_busy_answer_after_queue_timeout(gsrv, tmp_path: Path) -> None:
    ca, tls = tls_files(tmp_path)
    server = gsrv(
        service_toml("plain", ["sleep", "5"], busy_banner="busy\n", **QUEUE)
        + service_toml("tls", ["sleep", "5"], tls=tls, busy_banner="busy\n", **QUEUE)
        + service_toml("web", CGI, transport="http", **QUEUE)
        + service_with("ws", ["sleep", "5"], "websocket", {"messages": "text"}, transport="websocket", **QUEUE)
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    clients = {"plain": lambda: raw(server.address("plain")), "tls": lambda: raw(server.address("tls"), context),
               "web": lambda: http(server.address("web")), "ws": lambda: websocket(server.address("ws"))}  # fmt: skip
    with ThreadPoolExecutor(len(clients) * CLIENTS) as pool:
        futures = {name: [pool.submit(client) for _ in range(CLIENTS)] for name, client in clients.items()}
        answers = {name: [f.result(timeout=60) for f in done] for name, done in futures.items()}
    busy_answer = {"plain": b"busy\n", "tls": b"busy\n", "ws": b"close 1013"}
    for name, got in answers.items():
        busy = [(took, reply) for took, reply in got if (reply.startswith(b"HTTP/1.1 503 ") if name == "web"
                                                         else reply == busy_answer[name])]  # fmt: skip
        assert len(busy) == CLIENTS - SLOTS, (name, got)
        assert all(took >= 1.0 for took, _ in busy), (name, sorted(busy)[:3])  # never before queue_timeout
        if name == "web":
            assert all(b"\r\nRetry-After: 1\r\n" in reply for _, reply in busy)
        wait_until(lambda n=name: len(ends(server, n)) == CLIENTS, 30, f"{name}'s {CLIENTS} lines")
        lines = ends(server, name)
        held = [line for line in lines if "reason=busy" in line]
        assert len(held) == CLIENTS - SLOTS and not any("exit=" in line for line in held), held[:2]  # no child
        waited = [float(re.search(r"duration_ms=(\S+)", line).group(1)) for line in held]  # type: ignore[union-attr]
        assert all(1000 <= ms <= 6000 for ms in waited), (name, waited)  # by queue_timeout + 5 s, gsrv's own clock
        assert sum("exit=0" in line for line in lines) == SLOTS, lines  # the two served


@pytest.mark.timeout(120)
def test_without_the_keys_the_backlog_holds_them_all_unanswered_and_serves_each(gsrv) -> None:
    server = gsrv(service_toml("plain", ["sh", "-c", "sleep 0.5; echo served"], max_sessions=SLOTS))
    with ThreadPoolExecutor(CLIENTS) as pool:
        got = [f.result(timeout=90) for f in [pool.submit(raw, server.address("plain")) for _ in range(CLIENTS)]]
    assert [reply for _, reply in got] == [b"served\n"] * CLIENTS
    assert server.count_log(r"reason=busy") == 0


@pytest.mark.timeout(120)
def test_the_memory_guards_pause_answers_those_held_at_once_and_holds_no_more(gsrv) -> None:
    guard = '[guard]\ninterval = "100ms"\nresume_samples = 2\n'
    server = gsrv(guard + service_toml("plain", ["sleep", "30"], busy_banner="busy\n", max_sessions=1,
                                       queue_timeout="60s", queue_max=10))  # fmt: skip
    first = socket.create_connection(server.address("plain"), timeout=60)  # takes the one slot
    wait_until(lambda: bool(server.children()), 10, "the first child")
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(raw, server.address("plain")) for _ in range(3)]
        wait_until(lambda: _held(server) == 3, 10, "three held")
        pressed = server.config.read_text().replace("resume_samples = 2\n", 'resume_samples = 2\nmax_rss = "1MiB"\n')
        server.config.write_text(pressed)
        server.signal(signal.SIGHUP)
        server.wait_log(r"event=accept_paused .*reason=rss")
        answers = [f.result(timeout=30) for f in held]
    assert [reply for _, reply in answers] == [b"busy\n"] * 3  # at once: their queue_timeout is 60 s
    late = socket.create_connection(server.address("plain"), timeout=60)  # the backlog holds it: not accepted
    late.settimeout(1.5)
    with pytest.raises(TimeoutError):
        late.recv(10)
    assert server.count_log(r"reason=busy") == 3
    late.close()
    first.close()


def _held(server) -> int:  # type: ignore[no-untyped-def]
    """Clients gsrv holds for a slot (the gate's waiting count, through SIGUSR1's dump)."""
    mark = len(server.lines)
    server.signal(signal.SIGUSR1)
    line = server.wait_log(r"event=dump ", start=mark)
    found = re.search(r"pending=(\d+)", line)
    return int(found.group(1)) if found else -1


@pytest.mark.timeout(120)
def test_an_operators_pause_holds_clients_in_the_backlog_and_starts_none_of_those_held(gsrv) -> None:
    admin = '[admin]\nlisten = "127.0.0.1:0"\n'
    server = gsrv(admin + service_toml("hold", ["sh", "-c", "echo served"], max_sessions=1, queue_timeout="60s"))
    base = "http://" + server.wait_log(r"event=admin_listening address=\S+").split("address=")[1].split()[0]
    from test_operate import call

    assert call(base + "/services/hold/pause", "POST", {})[0] == 200
    waiting = [socket.create_connection(server.address("hold"), timeout=30) for _ in range(2)]
    for sock in waiting:
        sock.settimeout(1.5)
        with pytest.raises(TimeoutError):  # unanswered: in the backlog, neither served nor busy
            sock.recv(10)
    assert server.count_log(r"event=session_end service=hold ") == 0
    assert call(base + "/services/hold/resume", "POST", {})[0] == 200
    for sock in waiting:
        sock.settimeout(30)
        assert sock.recv(10) == b"served\n"
        sock.close()
    assert server.count_log(r"reason=busy") == 0


@pytest.mark.timeout(120)
def test_an_operators_pause_with_busy_on_pause_answers_every_client_at_once(gsrv) -> None:
    admin = '[admin]\nlisten = "127.0.0.1:0"\n'
    server = gsrv(admin + service_toml("hold", ["sleep", "30"], busy_banner="busy\n", max_sessions=1,
                                       queue_timeout="60s", busy_on_pause=True))  # fmt: skip
    base = "http://" + server.wait_log(r"event=admin_listening address=\S+").split("address=")[1].split()[0]
    from test_operate import call

    assert call(base + "/services/hold/pause", "POST", {})[0] == 200
    with ThreadPoolExecutor(3) as pool:
        answers = [f.result(timeout=30) for f in [pool.submit(raw, server.address("hold")) for _ in range(3)]]
    assert [reply for _, reply in answers] == [b"busy\n"] * 3  # accepted and answered, not left in the backlog
    assert not server.children()
