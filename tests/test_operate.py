"""The operator's view on the admin listener (ops/control.py) with real gsrv, children and
sockets: /sessions as data (exact bytes, what each session waits on), ending one session,
pausing, resuming and draining a service, and who may ask."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import cgroup_gone, service_toml, wait_until

ADMIN = '[admin]\nlisten = "127.0.0.1:0"\n'


def admin_url(server) -> str:  # type: ignore[no-untyped-def]
    line = server.wait_log(r"event=admin_listening address=\S+")
    return "http://" + line.split("address=")[1].split()[0]


def call(url: str, method: str = "GET", body: object = None, headers: dict[str, str] | None = None,
         ) -> tuple[int, dict[str, object]]:  # fmt: skip
    data = None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers=sent | (headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def sessions(base: str, query: str = "") -> list[dict[str, object]]:
    status, found = call(base + "/sessions" + query)
    assert status == 200, found
    listed = found["sessions"]
    assert isinstance(listed, list)
    return listed


@pytest.mark.timeout(120)
def test_sessions_lists_200_live_sessions_with_exact_bytes_and_what_each_waits_on(gsrv) -> None:
    server = gsrv(ADMIN + service_toml("echo", ["cat"], max_sessions=300)
                  + service_toml("flood", ["yes"]) + service_toml("deaf", ["sleep", "600"]))  # fmt: skip
    base = admin_url(server)
    clients = []
    for n in range(198):
        sock = server.connect("echo")
        payload = os.urandom(100 + n)
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += sock.recv(65536)
        clients.append((sock, len(payload)))
    slow_reader = server.connect("flood")
    slow_reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf_child = server.connect("deaf")
    deaf_child.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until the child's stdin and the kernel's buffers are full
        try:
            sent += deaf_child.send(b"x" * 65536)
        except BlockingIOError:
            time.sleep(0.2)
            try:
                sent += deaf_child.send(b"x" * 65536)
            except BlockingIOError:
                break
    time.sleep(1.5)  # the echo sessions go idle
    listed = {s["id"]: s for s in sessions(base)}
    assert len(listed) == 200, len(listed)
    echo = sorted((s["bytes_in"], s["bytes_out"], s["waiting"]) for s in listed.values() if s["service"] == "echo")
    assert echo == [(100 + n, 100 + n, "idle") for n in range(198)]
    (flood,) = sessions(base, "?service=flood")
    assert flood["waiting"] == "client" and flood["bytes_out"] > 0, flood
    (deaf,) = sessions(base, "?service=deaf")
    assert deaf["waiting"] == "child" and 0 < deaf["bytes_in"] <= sent, deaf
    assert [s["id"] for s in sessions(base, "?waiting=child")] == [deaf["id"]]
    for fields in (flood, deaf):
        assert isinstance(fields["pid"], int) and fields["usage_of"] in ("cgroup", "child"), fields
        assert fields["memory"] and fields["relay"] and fields["peer"], fields
    for sock, _ in clients:
        sock.close()
    slow_reader.close()
    deaf_child.close()


def reload(server, text: str) -> None:  # type: ignore[no-untyped-def]
    before = server.count_log(r"event=reloaded")
    server.config.write_text(text)
    server.signal(signal.SIGHUP)
    wait_until(lambda: server.count_log(r"event=reloaded") > before, 10, "the reload")


def no_child_for(server, seconds: float) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert not server.children(), "a child started while accept was held"
        time.sleep(0.05)


def readiness(base: str, name: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{base}/readyz/{name}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def gsrv_cli(server, base: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """The operator's command line against this gsrv (its config, its admin address)."""
    return subprocess.run([sys.executable, "-m", "gsrv", *argv, "-c", str(server.config), "--admin",
                           base.removeprefix("http://")], capture_output=True, text=True, timeout=30,
                          env=os.environ | (env or {}))  # fmt: skip


@pytest.mark.timeout(90)
def test_gsrv_end_stops_one_session_with_its_reason_its_cgroup_gone_the_others_untouched(gsrv) -> None:
    server = gsrv(ADMIN + service_toml("hold", ["sleep", "600"]))
    base = admin_url(server)
    socks = [server.connect("hold") for _ in range(3)]
    wait_until(lambda: len(sessions(base)) == 3, 10, "three sessions")
    table = gsrv_cli(server, base, "sessions")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ["ID", "SERVICE", "PEER"]
    assert len(table.stdout.splitlines()) == 4 and table.stdout.count(" hold ") == 3, table.stdout
    listed = json.loads(gsrv_cli(server, base, "sessions", "--service", "hold", "--json").stdout)
    target = listed[0]
    ended = gsrv_cli(server, base, "end", str(target["id"]))
    assert (ended.returncode, ended.stdout) == (0, f"ended {target['id']}\n"), ended.stderr
    line = server.wait_log(rf"event=session_end service=hold session={target['id']} ")
    assert "reason=ended_by_admin" in line and "signal=TERM" in line, line
    server.wait_log(rf"event=admin_action action=end service=hold session={target['id']} by=127\.0\.0\.1:\d+")
    wait_until(lambda: not _alive(int(target["pid"])), 10, "its child gone")
    cgroup_gone(server, line)
    left = sessions(base)
    assert len(left) == 2 and target["id"] not in {s["id"] for s in left}
    assert all(_alive(int(s["pid"])) for s in left)  # type: ignore[call-overload]
    again = gsrv_cli(server, base, "end", str(target["id"]))
    assert again.returncode == 1 and f"no running session {target['id']}" in again.stderr, again.stderr
    for sock in socks:
        sock.close()


@pytest.mark.timeout(60)
def test_the_command_line_says_what_went_wrong(gsrv, tmp_path) -> None:
    tokens = tmp_path / "admin.tokens"
    tokens.write_text("first-admin-token-0001\n")
    server = gsrv(
        f'[admin]\nlisten = "127.0.0.1:0"\nauth = {{ bearer = "{tokens}" }}\n' + service_toml("echo", ["cat"])
    )
    base = admin_url(server)
    assert gsrv_cli(server, base, "pause", "echo").stdout == "paused echo\n"  # the config's token
    wrong = gsrv_cli(server, base, "resume", "echo", env={"GSRV_ADMIN_TOKEN": "not-the-token-at-all"})
    assert wrong.returncode == 1 and ": 401: " in wrong.stderr and "GSRV_ADMIN_TOKEN" in wrong.stderr, wrong.stderr
    missing = gsrv_cli(server, base, "drain", "nosuch")
    assert missing.returncode == 1 and "no service nosuch" in missing.stderr, missing.stderr
    assert gsrv_cli(server, base, "resume", "echo").stdout == "resumed echo\n"
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = gsrv_cli(server, f"http://127.0.0.1:{port}", "sessions")
    assert down.returncode == 1 and f"no gsrv answers at http://127.0.0.1:{port}" in down.stderr, down.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(90)
def test_pause_holds_new_clients_resume_serves_them_and_a_guard_pause_still_holds(gsrv) -> None:
    guard = '[guard]\ninterval = "100ms"\nresume_samples = 2\n'
    text = ADMIN + guard + service_toml("echo", ["cat"]) + service_toml("other", ["cat"])
    server = gsrv(text)
    base = admin_url(server)
    assert call(f"{base}/services/echo/pause", "POST", {})[0] == 200
    assert readiness(base, "echo") == (503, "not ready: paused_by_admin\n")
    assert readiness(base, "other") == (200, "ready\n")
    held = server.connect("echo", timeout=20)  # the kernel's backlog takes it; gsrv does not accept it
    held.sendall(b"first\n")
    no_child_for(server, 1.0)
    reload(server, text.replace("resume_samples = 2\n", 'resume_samples = 2\nmax_rss = "1MiB"\n'))
    server.wait_log(r"event=accept_paused reason=rss")
    assert call(f"{base}/services/echo/resume", "POST", {})[0] == 200  # the operator's pause only
    assert readiness(base, "echo")[0] == 503
    no_child_for(server, 1.0)
    reload(server, text)  # the guard lets go: now the held client is served
    assert held.recv(100) == b"first\n"
    held.close()
    assert readiness(base, "echo") == (200, "ready\n")
    server.wait_log(r"event=admin_action action=pause service=echo by=127\.0\.0\.1:\d+")


@pytest.mark.timeout(90)
def test_drain_of_one_service_ends_its_sessions_after_drain_timeout_while_another_serves(gsrv) -> None:
    text = ADMIN + '[server]\ndrain_timeout = "1s"\n' + service_toml("hold", ["sleep", "600"])
    server = gsrv(text + service_toml("echo", ["cat"]))
    base = admin_url(server)
    holding = server.connect("hold")
    wait_until(lambda: len(sessions(base, "?service=hold")) == 1, 10, "the hold session")
    assert call(f"{base}/services/hold/drain", "POST", {})[0] == 200
    late = server.connect("hold", timeout=20)  # waits in the backlog
    with server.connect("echo") as sock:  # the other service serves meanwhile
        sock.sendall(b"still here\n")
        assert sock.recv(100) == b"still here\n"
    line = server.wait_log(r"event=session_end service=hold", timeout=10)
    assert "reason=ended_by_admin" in line, line
    metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    assert 'gsrv_service_paused{reason="drained_by_admin",service="hold"} 1.0' in metrics
    no_child_for_service = sessions(base, "?service=hold")
    assert no_child_for_service == []  # the late client is still held: drained until resumed
    assert call(f"{base}/services/hold/resume", "POST", {})[0] == 200
    wait_until(lambda: len(sessions(base, "?service=hold")) == 1, 10, "the late client served")
    late.close()
    holding.close()


@pytest.mark.timeout(60)
def test_who_may_ask(gsrv, tmp_path) -> None:
    tokens = tmp_path / "admin.tokens"
    tokens.write_text("first-admin-token-0001\nsecond-admin-token-0002\n")
    config = tmp_path / "open.toml"
    config.write_text('[admin]\nlisten = "0.0.0.0:0"\n' + service_toml("echo", ["cat"]))
    check = subprocess.run([sys.executable, "-m", "gsrv", "check", "-c", str(config)], capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert check.returncode == 2 and "[admin] listen is 0.0.0.0:0, not loopback" in check.stderr, check.stderr
    server = gsrv(
        f'[admin]\nlisten = "127.0.0.1:0"\nauth = {{ bearer = "{tokens}" }}\n' + service_toml("echo", ["cat"])
    )
    base = admin_url(server)
    assert call(base + "/sessions")[0] == 401
    assert call(base + "/sessions", headers={"Authorization": "Bearer wrong-token-000000"})[0] == 401
    assert readiness(base, "echo") == (200, "ready\n")  # /readyz and /readyz/NAME stay open
    with urllib.request.urlopen(base + "/readyz", timeout=10) as reply:
        assert reply.status == 200
    good = {"Authorization": "Bearer second-admin-token-0002"}
    assert call(base + "/sessions", headers=good) == (200, {"sessions": [], "count": 0})
    assert call(base + "/services/echo/pause", "POST", {}, good | {"Origin": "http://evil.example"})[0] == 403
    assert call(base + "/services/echo/pause", "POST", None, good)[0] == 415  # no JSON body: a form cannot
    host = base.removeprefix("http://")
    assert call(base + "/sessions", headers=good | {"Host": f"rebound.example:{host.split(':')[1]}"})[0] == 403
    with urllib.request.urlopen(base + "/", timeout=10) as page:  # the status page's shell: no data in it
        assert page.status == 200 and b"status.js" in page.read()
        assert page.headers["Content-Security-Policy"] == "default-src 'self'; frame-ancestors 'none'"  # no framing
    assert call(base + "/status.json")[0] == 401  # its data: guarded
    status, shown = call(base + "/status.json", headers=good)
    assert status == 200 and {"services", "guard", "history", "sessions", "count", "control"} <= set(shown)
    assert call(base + "/services/echo/pause", "POST", {}, good | {"Origin": base})[0] == 200
    server.wait_log(r"event=admin_action action=pause service=echo by=127\.0\.0\.1:\d+ token=token-2")
    assert "second-admin-token" not in "\n".join(server.lines)


@pytest.mark.timeout(60)
def test_control_false_makes_the_view_read_only(gsrv) -> None:
    server = gsrv('[admin]\nlisten = "127.0.0.1:0"\ncontrol = false\n' + service_toml("echo", ["cat"]))
    base = admin_url(server)
    assert call(base + "/services")[0] == 200
    status, reply = call(base + "/services/echo/pause", "POST", {})
    assert status == 403 and "control = false" in str(reply["error"])
    assert readiness(base, "echo") == (200, "ready\n")
