"""Admission, cleanup, signals and reload on a real gsrv process."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest
from conftest import PY, ROOT, Gsrv, exchange, open_fds, py_child, random_stream, service_toml, wait_until

MiB = 1024 * 1024


def _accepted(server: Gsrv, port: int) -> int:
    """Connections gsrv holds an fd for (accepted ones; those in the backlog have none)."""
    conns = server.ps.net_connections(kind="tcp")
    return sum(1 for c in conns if c.status != psutil.CONN_LISTEN and c.laddr.port == port)


@pytest.mark.parametrize("relay", ["auto", "socket"])  # the pipe relays and socket handoff
@pytest.mark.timeout(60)
def test_max_sessions_holds_exactly_and_surplus_waits_in_backlog(gsrv, relay) -> None:
    child = py_child("""
        import sys, time
        data = sys.stdin.buffer.read()
        time.sleep(0.4)
        sys.stdout.buffer.write(data)
    """)
    server = gsrv(service_toml("two", child, max_sessions=2, relay=relay))
    port = server.address("two")[1]
    peaks = {"children": 0, "accepted": 0}
    done = threading.Event()

    def alive(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def watch() -> None:
        while not done.is_set():
            running = [p for p in server.children() if alive(p)]  # the spawner's children: the commands
            peaks["children"] = max(peaks["children"], len(running))
            peaks["accepted"] = max(peaks["accepted"], _accepted(server, port))
            time.sleep(0.005)

    results: dict[int, bytes | Exception] = {}

    def client(i: int) -> None:
        try:
            with server.connect("two") as sock:
                results[i] = exchange(sock, f"client {i}".encode())
        except Exception as e:
            results[i] = e

    watcher = threading.Thread(target=watch)
    watcher.start()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=30)
    done.set()
    watcher.join(timeout=5)
    assert results == {i: f"client {i}".encode() for i in range(6)}
    assert peaks["children"] == 2, peaks
    assert peaks["accepted"] == 2, peaks
    wait_until(lambda: server.count_log(r"event=session_end service=two .*reason=eof") == 6, 10, "6 session_end lines")


@pytest.mark.parametrize("relay", ["auto", "socket"])  # the pipe relays and socket handoff
@pytest.mark.timeout(120)
def test_500_sequential_sessions_leave_nothing_behind(gsrv, relay) -> None:
    server = gsrv(service_toml("cat", ["cat"], relay=relay))
    with server.connect("cat") as sock:
        assert exchange(sock, b"warm-up") == b"warm-up"
    server.wait_log(r"event=session_end")
    wait_until(lambda: not server.children(), 5, "the warm-up child to be reaped")
    baseline = open_fds(server.proc.pid)
    for i in range(500):
        with server.connect("cat") as sock:
            assert exchange(sock, b"%d" % i) == b"%d" % i
    wait_until(lambda: server.count_log(r"event=session_end") == 501, 20, "501 session_end lines")
    wait_until(lambda: not server.children(), 5, "every child to be reaped (no zombie)")
    wait_until(lambda: open_fds(server.proc.pid) <= baseline, 5, f"open fds back to {baseline}")
    assert open_fds(server.proc.pid) == baseline


@pytest.mark.parametrize("relay", ["auto", "socket"])  # the pipe relays and socket handoff
@pytest.mark.timeout(120)
def test_sigterm_lets_a_transfer_finish_then_exits_0(gsrv, relay) -> None:
    server = gsrv(service_toml("echo", ["cat"], relay=relay))
    total = 20 * MiB
    sent, got = hashlib.sha256(), hashlib.sha256()
    received = 0
    started = threading.Event()

    def push(sock: socket.socket) -> None:
        for n, piece in enumerate(random_stream(total, seed=3, chunk=256 * 1024)):
            sent.update(piece)
            sock.sendall(piece)
            if n == 4:
                started.set()
            time.sleep(0.02)  # ~12 MB/s: the transfer takes a while
        sock.shutdown(socket.SHUT_WR)

    with server.connect("echo") as sock:
        sender = threading.Thread(target=push, args=(sock,))
        sender.start()
        assert started.wait(10)
        server.signal(signal.SIGTERM)
        while chunk := sock.recv(65536):
            got.update(chunk)
            received += len(chunk)
        sender.join(timeout=30)
    assert received == total and got.hexdigest() == sent.hexdigest()
    assert server.wait(timeout=30) == 0
    server.close()
    assert any("event=state state=draining" in line for line in server.lines)
    # The listener is closed during the drain: a new client is refused, not queued.
    with pytest.raises(OSError):
        socket.create_connection(server.address("echo"), timeout=2).close()


@pytest.mark.parametrize("relay", ["auto", "socket"])  # the pipe relays and socket handoff
@pytest.mark.timeout(60)
def test_second_sigterm_skips_the_drain(gsrv, relay) -> None:
    server = gsrv(service_toml("forever", ["sleep", "300"], relay=relay))
    with server.connect("forever") as sock:
        child = wait_until(server.children, 10, "the child")[0]  # type: ignore[index]
        server.signal(signal.SIGTERM)
        server.wait_log(r"event=draining")
        time.sleep(0.3)
        assert server.proc.poll() is None and child.is_running()  # the drain waits for it
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
    wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 5, "the child to be gone")
    server.close()
    assert any("reason=shutdown" in line for line in server.lines)


@pytest.mark.parametrize("relay", ["auto", "socket"])  # the pipe relays and socket handoff
@pytest.mark.timeout(60)
def test_sighup_swaps_the_command_and_keeps_running_sessions(gsrv, relay) -> None:
    server = gsrv(service_toml("svc", ["cat"], relay=relay))
    old = server.connect("svc")
    old.sendall(b"before ")
    assert old.recv(100) == b"before "
    server.config.write_text(server.config.read_text().replace('["cat"]', '["tr", "a-z", "A-Z"]'))
    server.signal(signal.SIGHUP)
    server.wait_log(r"event=reloaded")
    with server.connect("svc") as new:
        assert exchange(new, b"after") == b"AFTER"
    assert exchange(old, b"still cat") == b"still cat"  # the running session keeps its command
    old.close()
    good = server.config.read_text()
    server.config.write_text(good.replace("max_sessions", "max_sesions") + "\nmax_sesions = 3\n")
    server.signal(signal.SIGHUP)
    failed = server.wait_log(r"event=reload_failed")
    assert 'unknown key \\"max_sesions\\"' in failed and "next=" in failed
    with server.connect("svc") as new:
        assert exchange(new, b"still up") == b"STILL UP"


@pytest.mark.timeout(120)
def test_stalled_log_reader_does_not_stall_sessions(gsrv) -> None:
    noisy = py_child("""
        import sys
        data = sys.stdin.buffer.read()
        for i in range(50):
            sys.stderr.write(f"stderr line {i} " + "x" * 200 + "\\n")
        sys.stdout.buffer.write(data)
    """)
    server = gsrv(service_toml("noisy", noisy), read_log=False)  # nobody reads gsrv's stderr
    listening = wait_until(
        lambda: [c.laddr for c in server.ps.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN],
        10,
        "gsrv to listen",
    )
    address = (listening[0].ip, listening[0].port)  # type: ignore[index]
    for i in range(300):  # ~4 MB of log lines: far more than a pipe holds
        with socket.create_connection(address, timeout=10) as sock:
            assert exchange(sock, b"%d" % i) == b"%d" % i


@pytest.mark.timeout(30)
def test_port_in_use_exits_1_naming_the_address(tmp_path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = tmp_path / "busy.toml"
    config.write_text(f'[services.busy]\nlisten = "127.0.0.1:{port}"\ncommand = ["cat"]\n')
    try:
        result = subprocess.run(
            [PY, "-m", "gsrv", "serve", "-c", str(config)], capture_output=True, timeout=20, cwd=ROOT
        )
    finally:
        holder.close()
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"Error: service busy: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


@pytest.mark.timeout(90)
def test_out_of_fds_clients_wait_in_the_backlog(tmp_path) -> None:
    import resource

    config = tmp_path / "fds.toml"
    config.write_text('[server]\nkill_grace = "1s"\n' + service_toml("cat", ["cat"]))
    limit = 40  # gsrv needs ~15 fds itself; each session holds 4 and needs 8 more to spawn
    server = Gsrv(config, preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    try:
        clients = []
        for _ in range(20):
            sock = server.connect("cat", timeout=0.3)
            sock.sendall(b"hi")
            clients.append(sock)
        server.wait_log(r"event=accept_paused service=cat reason=resources")
        served = resets = 0
        for sock in clients:  # the backlog is FIFO: ending each served session frees fds for the next
            sock.settimeout(20)
            try:
                assert sock.recv(10) == b"hi"
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(10) == b""
                served += 1
            except ConnectionResetError:
                resets += 1
            sock.close()
        assert served + resets == 20
        assert resets == 0, f"{resets} clients were reset; they should have waited"
        assert server.count_log(r"reason=spawn_failed") == resets
        server.wait_log(r"event=accept_resumed service=cat")
        assert not any("Traceback" in line for line in server.lines)
        assert server.proc.poll() is None
    finally:
        server.stop()


def _keepalive_timer(port: int) -> str:
    """The keepalive timer ss(8) shows on gsrv's side of the connection to `port`."""
    out = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
    assert out.strip(), f"ss shows no established connection on port {port}"
    found = re.search(r"timer:\(keepalive,([^,]+),", out)
    return found.group(1) if found else "none"


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2), which .ci/run installs")
def test_keepalive_reaches_accepted_sockets_and_follows_reload(gsrv) -> None:
    # Set once on the listener, inherited by every accepted socket; a reload re-applies it.
    text = service_toml("cat", ["cat"], keepalive="7s")
    server = gsrv(text)
    port = server.address("cat")[1]
    with server.connect("cat", timeout=10) as sock:
        sock.sendall(b"x")
        assert sock.recv(10) == b"x"
        timer = _keepalive_timer(port)  # "6.99..." (ss shows 60 s as "59sec", 5 min as "4min59sec")
        assert "min" not in timer and float(re.match(r"[\d.]+", timer)[0]) <= 7, timer
    server.config.write_text(text.replace('keepalive = "7s"', 'keepalive = "0s"'))
    lines = len(server.lines)
    server.signal(signal.SIGHUP)
    server.wait_log("event=reloaded", start=lines)
    with server.connect("cat", timeout=10) as sock:
        sock.sendall(b"y")
        assert sock.recv(10) == b"y"
        assert _keepalive_timer(port) == "none"
