"""The real HAProxy (Debian's haproxy) in front of gsrv, sending PROXY protocol v2."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Gsrv, service_toml, wait_until

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
SESSIONS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[tuple[str, int]], tuple[str, int]]]:
    """Start HAProxy in TCP mode forwarding to a backend with send-proxy-v2; returns its address."""
    if not os.path.exists(HAPROXY):
        pytest.fail("haproxy is not installed: apt-get install haproxy (.ci/run does it)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(backend: tuple[str, int]) -> tuple[str, int]:
        port = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            f"""
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{port}
    default_backend gsrv
backend gsrv
    server gsrv {backend[0]}:{backend[1]} send-proxy-v2 source 127.0.0.1
"""
        )
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)

        def listening() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "haproxy exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(listening, 10, "haproxy to listen")
        return "127.0.0.1", port

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()


def test_a_thousand_sessions_through_haproxy_keep_the_clients_address_and_every_byte(
    gsrv: Callable[..., Gsrv], haproxy: Callable[[tuple[str, int]], tuple[str, int]]
) -> None:
    command = ["sh", "-c", 'echo "$TCPREMOTEIP:$TCPREMOTEPORT"; exec sha256sum']
    server = gsrv(service_toml("behind", command, proxy_protocol="v2", proxy_trusted=["127.0.0.1/32"]))
    front = haproxy(server.address("behind"))
    # (the fixture's probe that HAProxy listens is one more session, from 127.0.0.1)
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]

    def one(n: int) -> str | None:
        rng = random.Random(n)
        payload = rng.randbytes(rng.randint(0, 256 * 1024))
        source = sources[n % len(sources)]
        with socket.create_connection(front, timeout=30, source_address=(source, 0)) as sock:
            port = sock.getsockname()[1]
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            reply = b"".join(iter(lambda: sock.recv(65536), b""))
        expected = f"{source}:{port}\n{hashlib.sha256(payload).hexdigest()}  -\n".encode()
        return None if reply == expected else f"session {n}: {reply[:200]!r} != {expected!r}"

    with ThreadPoolExecutor(max_workers=16) as pool:
        failures = [f for f in pool.map(one, range(SESSIONS)) if f]
    assert not failures, failures[:5]
    ours = r"service=behind session=\S+ peer=127\.0\.0\.[234]:\d+ proxy=127\.0\.0\.1:\d+ .*exit=0 .*reason=eof"
    wait_until(lambda: server.count_log(ours) >= SESSIONS, 20, "every session's end")
    assert server.count_log(ours) == SESSIONS
    assert server.count_log(r"reason=proxy_failed") == 0
