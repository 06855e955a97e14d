"""Chaos scenarios 1, 4 and 5: a flood of connections, running out of fds, a stderr flood."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path

import audit
import psutil
import pytest
from conftest import Gsrv, random_stream, service_toml, wait_until

FLOOD = 2000
PAUSED = r"event=accept_paused service=cat reason=resources"
RESUMED = r"event=accept_resumed service=cat reason=resources pauses=\d+"


def _flood(address: tuple[str, int], count: int, deadline_s: float) -> tuple[float, dict[int, bytes], list[str]]:
    """Connect `count` clients at once (non-blocking), each sends its number and half-closes;
    returns how long the connects took to start, the replies, and any errors."""
    sel = selectors.DefaultSelector()
    started = time.monotonic()
    for n in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(address)
        assert code in (0, errno.EINPROGRESS), os.strerror(code)
        sel.register(sock, selectors.EVENT_WRITE, [n, b""])
    connecting = time.monotonic() - started
    replies: dict[int, bytes] = {}
    errors: list[str] = []
    deadline = started + deadline_s
    while sel.get_map() and time.monotonic() < deadline:
        for key, events in sel.select(timeout=1.0):
            sock, data = key.fileobj, key.data
            assert isinstance(sock, socket.socket)
            try:
                if events & selectors.EVENT_WRITE:
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise OSError(error, os.strerror(error))
                    sock.send(b"%010d" % data[0])
                    sock.shutdown(socket.SHUT_WR)
                    sel.modify(sock, selectors.EVENT_READ, data)
                    continue
                chunk = sock.recv(100)
                if chunk:
                    data[1] += chunk
                    continue
                replies[data[0]] = data[1]
            except OSError as e:
                errors.append(f"client {data[0]}: {e}")
            sel.unregister(sock)
            sock.close()
    for key in list(sel.get_map().values()):
        errors.append(f"client {key.data[0]}: no reply within {deadline_s}s")
        key.fileobj.close()  # type: ignore[union-attr]
    return connecting, replies, errors


@pytest.mark.timeout(180)
def test_a_flood_of_2000_clients_on_100_slots_is_served_in_full(gsrv: Callable[..., Gsrv]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, FLOOD + 500)), hard))
    try:
        server = gsrv(service_toml("flood", ["cat"], max_sessions=100, backlog=4096))
        base = audit.snapshot(server)
        _, replies, errors = _flood(server.address("flood"), FLOOD, deadline_s=120)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not errors, f"{len(errors)} clients refused or reset: {errors[:5]}"
    assert all(replies[n] == b"%010d" % n for n in range(FLOOD))
    audit.wait_quiet(server, FLOOD)
    assert server.count_log(r"event=session_end service=flood .*reason=eof") == FLOOD
    audit.settle(server, base)
    audit.no_leftovers(server, audit.rss_bound(base))


@pytest.mark.timeout(120)
def test_out_of_fds_gsrv_backs_off_logs_once_per_burst_and_recovers(tmp_path: Path) -> None:
    config = tmp_path / "fds.toml"
    config.write_text('[server]\nkill_grace = "1s"\n' + service_toml("cat", ["cat"]))
    limit = 40  # gsrv needs ~15 fds itself; each session holds 4 and needs more to spawn
    server = Gsrv(config, preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    try:
        base = audit.snapshot(server)
        for burst in (1, 2):
            clients = [server.connect("cat", timeout=20) for _ in range(20)]
            for sock in clients:
                sock.sendall(b"hi")
            wait_until(lambda b=burst: server.count_log(PAUSED) == b, 10, f"accept_paused for burst {burst}")
            cpu = sum(server.ps.cpu_times()[:2])
            time.sleep(2)  # every fd in use, clients waiting: gsrv must not spin
            spent = sum(server.ps.cpu_times()[:2]) - cpu
            assert spent < 0.5, f"gsrv used {spent:.2f}s of CPU in 2s while out of fds"
            for sock in clients:  # ending each served session frees fds for the next (FIFO backlog)
                assert sock.recv(10) == b"hi"
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(10) == b""
                sock.close()
            wait_until(lambda b=burst: server.count_log(RESUMED) == b, 20, "accept_resumed, once")
            # once per burst: one pause line however many accepts and spawns failed
            assert server.count_log(r"event=accept_paused service=cat") == burst
        audit.wait_quiet(server, 40)
        assert server.count_log(r"event=session_end service=cat .*reason=eof") == 40
        audit.settle(server, base)
        audit.no_leftovers(server, audit.rss_bound(base))
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_a_stderr_flood_keeps_the_log_bounded_and_the_data_exact(gsrv: Callable[..., Gsrv]) -> None:
    noisy = ["sh", "-c", "yes 'a line of noise on stderr' >&2 & exec cat"]  # stderr flat out while cat echoes
    server = gsrv(service_toml("noisy", noisy))
    base = audit.snapshot(server)
    size = 16 * 1024 * 1024
    expected = hashlib.sha256()
    got = hashlib.sha256()
    received = 0
    started = time.monotonic()
    with server.connect("noisy") as sock:
        pieces = random_stream(size, seed=5)
        sock.setblocking(False)
        pending = b""
        while received < size:  # send and receive in one loop: cat's output must be read as it comes
            if not pending:
                pending = next(pieces, b"")
                expected.update(pending)
            if pending:
                with contextlib.suppress(BlockingIOError):
                    pending = pending[sock.send(pending) :]
            try:
                chunk = sock.recv(1 << 20)
                got.update(chunk)
                received += len(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            assert time.monotonic() - started < 60
        sock.setblocking(True)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
    took = time.monotonic() - started
    assert got.hexdigest() == expected.hexdigest()
    line = server.wait_log(r"event=session_end service=noisy")
    dropped = int(audit.fields(line)["stderr_dropped"])
    logged = server.count_log(r"event=child_stderr")
    assert dropped > logged  # `yes` writes far more lines than the log takes
    assert logged <= 100 * (took + 2) + 100, f"{logged} stderr lines in {took:.1f}s: over 100 per second"
    assert server.rss() < audit.rss_bound(base)
    audit.settle(server, base)
    audit.no_leftovers(server, audit.rss_bound(base))
    assert psutil.Process(server.proc.pid).is_running()
