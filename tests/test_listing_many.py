"""The operator's /sessions with 10,000 stalled sessions (issue 28): each listing is whole and
right, and another session of the same gsrv keeps flowing meanwhile (the walk leaves the loop
to the relays between its slices: gsrv/periodic.py's in_slices), with both cores kept busy by
two busy loops beside it. Flowing is a count, not a speed: a one-byte ping through an echo
session makes many round trips while a listing is answered, where a walk that held the loop
would allow at most the one in flight. How long a listing takes and a full stream's rate
meanwhile are bench/sessions_listing.py's figures (a busy CI machine once took 3 s to list,
which says nothing about gsrv)."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from conftest import service_toml, wait_until
from test_operate import ADMIN, admin_url, call

MANY = 10_000
ROUNDS_MIN = 5  # round trips while one listing is answered: a walk that held the loop allows 0 or 1


class PingPong:
    """One byte at a time through an echo session, the next sent when the last came back:
    `rounds` counts the round trips."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.rounds, self.stop = sock, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.sock.sendall(b"x")
            if not self.sock.recv(1):
                return
            self.rounds += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.sock.close()


def running(base: str, service: str) -> int:
    _, found = call(base + "/services")
    return next(int(s["sessions"]) for s in found["services"] if s["name"] == service)  # type: ignore[attr-defined]


@pytest.mark.timeout(300)
def test_10000_stalled_sessions_are_listed_while_another_session_keeps_flowing(gsrv) -> None:
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
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]  # both cores
        ping = PingPong(server.connect("echo"))
        try:
            wait_until(lambda: ping.rounds >= 10, 60, "the echo session running")
            for _ in range(3):
                before = ping.rounds
                with urllib.request.urlopen(base + "/sessions", timeout=60) as reply:
                    body = reply.read()
                rounds = ping.rounds - before
                listed = json.loads(body)
                assert listed["count"] == MANY + 1 == len(listed["sessions"])
                stalled = [s for s in listed["sessions"] if s["service"] == "stall"]
                assert len(stalled) == MANY
                assert {s["waiting"] for s in stalled} == {"idle"}, {s["waiting"] for s in stalled}
                assert all(s["pid"] and s["usage_of"] == "child" and s["memory"] > 0 for s in stalled)
                assert rounds >= ROUNDS_MIN, f"{rounds} round trips through another session while a listing ran"
        finally:
            ping.close()
            for proc in busy:
                proc.kill()
                proc.wait(timeout=10)
    finally:
        for sock in clients:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # a reset: the session ends
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
