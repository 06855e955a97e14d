"""auth with real gsrv and real clients: htpasswd's own bcrypt and SHA-crypt entries and bearer
tokens over HTTP and on the WebSocket upgrade; 401 without (the child never starts), 200 with
(REMOTE_USER for the child), 429 after repeated failures, SIGHUP with a new file."""

from __future__ import annotations

import base64
import signal
import socket
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest
from conftest import py_child, service_toml, wait_until

CHILD = py_child("""
import os, sys
user, kind = os.environ.get("REMOTE_USER", "-"), os.environ.get("AUTH_TYPE", "-")
open(os.environ["MARKER"], "a").write(user + "\\n")
sys.stdout.write("Content-Type: text/plain\\n\\n" + user + " " + kind)
""")


def htpasswd(path: Path, flag: str, user: str, password: str) -> None:
    line = subprocess.run(["htpasswd", "-nb" + flag, user, password], capture_output=True, text=True, timeout=30)
    with path.open("a") as f:
        f.write(line.stdout.strip() + "\n")


def curl(*args: str) -> tuple[str, str]:
    run = subprocess.run(["curl", "-sS", "-o", "-", "-w", " %{http_code}", *args], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    body, _, code = run.stdout.rpartition(" ")
    return body, code


@pytest.mark.timeout(90)
def test_basic_auth_with_htpasswds_entries_and_a_new_file_on_sighup(gsrv, tmp_path: Path) -> None:
    users, marker = tmp_path / "htpasswd", tmp_path / "started"
    for flag, user in (("B", "alice"), ("2", "bob"), ("5", "carol")):
        htpasswd(users, flag, user, f"{user}-secret")
    server = gsrv(service_toml("app", CHILD, transport="http", auth={"basic": str(users)},
                               env={"MARKER": str(marker)}))  # fmt: skip
    host, port = server.address("app")
    url = f"http://{host}:{port}/"
    body, code = curl(url)
    assert code == "401" and not marker.exists()
    head = subprocess.run(["curl", "-sS", "-i", url], capture_output=True, text=True, timeout=30).stdout
    assert 'WWW-Authenticate: Basic realm="gsrv", charset="UTF-8"' in head
    for user in ("alice", "bob", "carol"):
        assert curl("-u", f"{user}:{user}-secret", url) == (f"{user} Basic", "200")
    assert curl("-u", "alice:wrong", url)[1] == "401"
    assert marker.read_text().split() == ["alice", "bob", "carol"]
    assert "user=alice" in server.wait_log(r"event=session_end service=app .*status=200")
    wait_until(lambda: server.count_log(r"reason=unauthorized") == 3, 10, "three unauthorized lines")
    users.write_text("")
    htpasswd(users, "B", "dave", "dave-secret")
    server.signal(signal.SIGHUP)
    server.wait_log(r"event=reloaded")
    assert curl("-u", "dave:dave-secret", url) == ("dave Basic", "200")
    assert curl("-u", "alice:alice-secret", url)[1] == "401"


@pytest.mark.timeout(60)
def test_bearer_tokens_and_429_after_repeated_failures(gsrv, tmp_path: Path) -> None:
    tokens, marker = tmp_path / "tokens", tmp_path / "started"
    tokens.write_text("# a comment\nfirst-token-0123456789\nsecond-token-0123456789\n")
    server = gsrv(service_toml("api", CHILD, transport="http", env={"MARKER": str(marker)},
                               auth={"bearer": str(tokens), "failures_per_minute": 3}))  # fmt: skip
    host, port = server.address("api")
    url = f"http://{host}:{port}/"
    assert curl("-H", "Authorization: Bearer second-token-0123456789", url) == ("token-2 Bearer", "200")
    codes = [curl("-H", f"Authorization: Bearer wrong-{n}-0123456789abcdef", url)[1] for n in range(4)]
    assert codes == ["401", "401", "401", "429"]
    assert curl("-H", "Authorization: Bearer first-token-0123456789", url)[1] == "429"  # the address waits now
    assert marker.read_text().split() == ["token-2"]
    wait_until(lambda: server.count_log(r"reason=auth_limited") == 2, 10, "two auth_limited lines")


@pytest.mark.timeout(60)
def test_the_websocket_upgrade_needs_the_credentials_too(gsrv, tmp_path: Path) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    users, marker = tmp_path / "htpasswd", tmp_path / "started"
    htpasswd(users, "B", "alice", "alice-secret")
    echo = py_child("import os, sys; open(os.environ['MARKER'], 'a').write('x'); print(os.environ['REMOTE_USER'])")
    server = gsrv(service_toml("ws", echo, transport="websocket", auth={"basic": str(users)},
                               env={"MARKER": str(marker)}))  # fmt: skip
    host, port = server.address("ws")
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://{host}:{port}/")
    assert refused.value.response.status_code == 401 and not marker.exists()
    token = base64.b64encode(b"alice:alice-secret").decode()
    with connect(f"ws://{host}:{port}/", additional_headers={"Authorization": f"Basic {token}"}) as ws:
        assert ws.recv(timeout=20) == "alice"
    wait_until(marker.exists, 10, "the child")


def status_as(address: tuple[str, int], user: str, password: str, source: str = "127.0.0.1") -> int:
    """One request with basic credentials from `source` (a loopback address): its status."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    with socket.create_connection(address, timeout=30, source_address=(source, 0)) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {token}\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
    return int(head.split(b" ")[1])


@pytest.mark.timeout(120)
def test_concurrent_wrong_passwords_start_at_most_the_limits_verifications(gsrv, tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    # cost 12: ~0.25 s a verification, slow enough to overlap
    users.write_text(
        "".join(f"{u}:{bcrypt.hashpw(f'{u}-secret'.encode(), bcrypt.gensalt(12)).decode()}\n" for u in ("alice", "bob"))
    )
    server = gsrv(service_toml("app", CHILD, transport="http", auth={"basic": str(users)},
                               env={"MARKER": str(tmp_path / "started")}))  # fmt: skip
    address = server.address("app")
    with ThreadPoolExecutor(31) as pool:
        wrong = [pool.submit(status_as, address, "alice", f"wrong-{n}") for n in range(30)]
        other = pool.submit(status_as, address, "bob", "bob-secret", "127.0.0.2")
        codes = sorted(f.result(timeout=60) for f in wrong)
        assert other.result(timeout=60) == 200  # another user's login, meanwhile
    assert codes.count(401) <= 10 and codes.count(401) + codes.count(429) == 30, codes


@pytest.mark.timeout(120)
def test_an_unknown_user_costs_the_same_verification_as_a_known_one(gsrv, tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    users.write_text(f"alice:{bcrypt.hashpw(b'alice-secret', bcrypt.gensalt(12)).decode()}\n")
    server = gsrv(service_toml("app", CHILD, transport="http", env={"MARKER": str(tmp_path / "started")},
                               auth={"basic": str(users), "failures_per_minute": 100}))  # fmt: skip
    address = server.address("app")
    took: dict[str, list[float]] = {"alice": [], "nobody": []}
    for _ in range(9):  # interleaved: a busy moment of the machine falls on both alike
        for user in took:
            started = time.monotonic()
            assert status_as(address, user, "wrong") == 401
            took[user].append(time.monotonic() - started)
    known, unknown = statistics.median(took["alice"]), statistics.median(took["nobody"])
    assert 0.8 < unknown / known < 1.25, took  # a generous ratio: an unknown user answered at once was ~1/50
