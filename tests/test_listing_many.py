"""The operator's /sessions with 10,000 stalled sessions (issue 28): each listing is whole and
right, and a stream through another session of the same gsrv keeps its rate meanwhile (the
walk leaves the loop to the relays between its slices: gsrv/periodic.py's in_slices). How long
a listing takes is a speed, bench/sessions_listing.py's figure (under a second there): a
busy CI machine once took 3 s, which says nothing about gsrv.

The stream is paced (PACE bytes a second, echoed by `cat`), so its rate is the same whatever
the machine's speed unless gsrv holds its relay up; a full-speed stream's rate, which the
listing's CPU shares two cores with, is bench/sessions_listing.py's figure."""

from __future__ import annotations

import json
import resource
import socket
import threading
import time
import urllib.request

import pytest
from conftest import service_toml, wait_until
from test_operate import ADMIN, admin_url, call

MANY = 10_000
PACE = 32 * 1024 * 1024  # the stream's bytes a second: a block every 2 ms
BLOCK = 65536


class PacedEcho:
    """Sends BLOCK at a time on a schedule of PACE bytes a second (catching up after a hold-up,
    so a stall shows only while it lasts) and counts what comes back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.received, self.stop = sock, 0, threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]  # fmt: skip
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        began, sent, block = time.monotonic(), 0, b"x" * BLOCK
        while not self.stop.is_set():
            if sent < (time.monotonic() - began) * PACE:
                self.sock.sendall(block)
                sent += BLOCK
            else:
                time.sleep(0.001)

    def _receive(self) -> None:
        while not self.stop.is_set():
            got = self.sock.recv(1 << 20)
            if not got:
                return
            self.received += len(got)

    def rate_over(self, work: object) -> tuple[float, object]:
        """Bytes a second that came back while `work` (a callable) ran, and its result."""
        assert callable(work)
        before, t0 = self.received, time.monotonic()
        result = work()
        return (self.received - before) / (time.monotonic() - t0), result

    def close(self) -> None:
        self.stop.set()
        self.threads[0].join(timeout=5)
        self.sock.shutdown(socket.SHUT_WR)
        self.threads[1].join(timeout=5)
        self.sock.close()


def running(base: str, service: str) -> int:
    _, found = call(base + "/services")
    return next(int(s["sessions"]) for s in found["services"] if s["name"] == service)  # type: ignore[attr-defined]


@pytest.mark.timeout(300)
def test_10000_stalled_sessions_are_listed_while_a_stream_keeps_its_rate(gsrv) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < MANY + 2000:
        pytest.skip(f"the hard RLIMIT_NOFILE is {hard}: this test holds {MANY} sockets here and in gsrv")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # gsrv inherits it
    clients: list[socket.socket] = []
    try:
        stall = service_toml("stall", ["sleep", "600"], relay="socket", stderr="discard", kill_scope="group",
                             max_sessions=MANY, backlog=4096)  # fmt: skip
        server = gsrv(ADMIN + stall + service_toml("echo", ["cat"]))
        base = admin_url(server)
        for _ in range(MANY):
            clients.append(server.connect("stall"))
        wait_until(lambda: running(base, "stall") == MANY, 120, f"{MANY} stall sessions running")
        stream = PacedEcho(server.connect("echo"))
        time.sleep(1)  # the stream settles
        alone, _ = stream.rate_over(lambda: time.sleep(3))
        took: list[float] = []

        def listings() -> list[bytes]:
            bodies = []
            for _ in range(3):
                t = time.monotonic()
                with urllib.request.urlopen(base + "/sessions", timeout=30) as reply:
                    bodies.append(reply.read())
                took.append(time.monotonic() - t)
            return bodies

        during, bodies = stream.rate_over(listings)
        stream.close()
        for body in bodies:  # type: ignore[attr-defined]
            listed = json.loads(body)
            assert listed["count"] == MANY + 1 == len(listed["sessions"])
            stalled = [s for s in listed["sessions"] if s["service"] == "stall"]
            assert len(stalled) == MANY
            assert {s["waiting"] for s in stalled} == {"idle"}, {s["waiting"] for s in stalled}
            assert all(s["pid"] and s["usage_of"] == "child" and s["memory"] > 0 for s in stalled)
        assert during >= 0.9 * alone, f"the stream: {alone / 1e6:.1f} MB/s alone, {during / 1e6:.1f} during {took}"
    finally:
        for sock in clients:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # a reset: the session ends
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
