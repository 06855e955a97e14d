"""reattach = DURATION (the terminal page's gsrv-term protocol, edge/hello.py) with real gsrv and
a client of the tests' own (raw sockets, wsproto's frames): a dropped connection's session
waits, a reconnection with the token gets every byte once, a takeover, tokens refused, the
window's end, the bearer token in the hello, the detached gauge."""

from __future__ import annotations

import re
import signal
import time
import urllib.request

import pytest
from conftest import ROOT, cgroup_gone, py_child, service_with, wait_until
from termclient import answered

ADMIN = '[admin]\nlisten = "127.0.0.1:0"\n'
LINES = 40_000  # "line00001\r\n" each: 440 KB of output, more than the default window (256 KiB)
COUNTER = py_child(
    "import sys, time\n"
    "sys.stdin.readline()\n"  # the test's "go"
    f"for i in range(1, {LINES} + 1):\n"
    "    sys.stdout.write(f'line{i:05d}\\n')\n"
    "    if i % 2000 == 0:\n"
    "        sys.stdout.flush(); time.sleep(0.05)\n"
)
EXPECTED = b"".join(b"line%05d\r\n" % i for i in range(1, LINES + 1))


def term_service(name: str, command: list[str], websocket: dict[str, object] | None = None, **keys: object) -> str:
    return service_with(name, command, "websocket", {"reattach": "5m"} | (websocket or {}),
                        transport="websocket", pty=True, **keys)  # fmt: skip


@pytest.mark.timeout(90)
def test_a_dropped_connection_reattaches_and_gets_every_byte_once(gsrv, term) -> None:
    server = gsrv(term_service("count", COUNTER))
    first = term(server, "count", {})
    answer = answered(first)
    assert answer["offset"] == 0 and isinstance(answer["token"], str) and len(answer["token"]) >= 22, answer
    first.send(b"igo\r")
    first.pump(lambda: first.output.count(b"\r\n") >= 12_000)
    pid = next(p.pid for p in server.children() if "python" in p.name())
    first.drop()  # bytes in flight now are the kernel's, then nobody's: gsrv keeps them until acknowledged
    server.wait_log(r"event=session_detached .*why=client_reset")
    time.sleep(0.5)
    assert [p.pid for p in server.children() if "python" in p.name()] == [pid]  # the session runs on
    offset = len(first.output)
    second = term(server, "count", {"resume": answer["token"], "offset": offset})
    assert answered(second)["offset"] == offset
    second.acked = 0
    second.pump(lambda: False, timeout=60)
    assert second.closed == (1000, "exit=0"), second.closed
    whole = bytes(first.output[:offset] + second.output)
    assert whole.replace(b"go\r\n", b"", 1) == EXPECTED  # (the terminal echoes the "go")
    line = server.wait_log(r"event=session_end service=count")
    assert "reason=eof" in line or "reason=child_exit" in line, line
    server.wait_log(rf"event=session_reattached .* offset={offset} ")
    assert server.count_log(r"event=session_token") == 0 and answer["token"] not in "\n".join(server.lines)


@pytest.mark.timeout(60)
def test_a_second_connection_with_the_token_takes_the_session_over(gsrv, term) -> None:
    server = gsrv(term_service("shell", ["cat"]))
    first = term(server, "shell", {})
    token = answered(first)["token"]
    first.send(b"ione\r")
    first.pump(lambda: first.output.count(b"one\r\n") == 2)  # the terminal's echo, then cat's
    second = term(server, "shell", {"resume": token, "offset": len(first.output)})
    answered(second)
    first.pump(lambda: False)
    assert first.closed == (4409, "taken_over"), first.closed
    second.send(b"itwo\r")
    second.pump(lambda: second.output.count(b"two\r\n") == 2)
    assert second.output == b"two\r\ntwo\r\n"  # what the first had is not sent again
    server.wait_log(r"event=session_reattached .* took_over=1")  # logged as the answer went; read here a moment later


@pytest.mark.timeout(60)
def test_tokens_that_name_no_session_here_are_refused_with_4404_and_start_nothing(gsrv, term) -> None:
    server = gsrv(term_service("shell", ["cat"]))
    ended = term(server, "shell", {})
    token = answered(ended)["token"]
    ended.send(b"i\x04")  # ^D: cat ends, and its session
    ended.pump(lambda: False)
    assert ended.closed is not None and ended.closed[0] == 1000
    for resume in (token, "A" * 22, ""):  # an ended session's token, a made-up one, an empty one
        client = term(server, "shell", {"resume": resume, "offset": 0})
        client.pump(lambda: False)
        assert client.closed == (4404, "no_session") and client.answer is None, (resume, client.closed)
    wait_until(lambda: server.count_log(r"event=session_end .*reason=no_session") == 3, 10, "three refusals")
    server.wait_log(r"event=session_end .*exit=0")
    assert server.count_log(r"event=session_end .*exit=") == 1  # the first session's only: no child for the others


@pytest.mark.timeout(60)
def test_the_reattach_window_passes_the_session_ends_with_its_reason_and_its_cgroup_goes(gsrv, term) -> None:
    server = gsrv(ADMIN + term_service("shell", ["sleep", "300"], {"reattach": "2s"}))
    client = term(server, "shell", {})
    answered(client)
    client.drop()
    server.wait_log(r"event=session_detached")
    admin = "http://" + server.wait_log(r"event=admin_listening address=\S+").split("address=")[1].split()[0]
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    assert 'gsrv_sessions_detached{service="shell"} 1.0' in metrics
    line = server.wait_log(r"event=session_end service=shell", timeout=15)
    assert "reason=reattach_expired" in line and "signal=" in line, line  # (the terminal's hangup, or TERM)
    cgroup_gone(server, line)
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as reply:
        assert 'gsrv_sessions_detached{service="shell"} 0.0' in reply.read().decode()


@pytest.mark.timeout(60)
def test_a_bearer_token_in_the_hello_and_the_same_user_to_reattach(gsrv, term, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("first-secret-token\nsecond-secret-token\n")
    marker = tmp_path / "started"
    child = py_child(f"import os, sys\nopen({str(marker)!r}, 'a').write('x')\n"
                     "print(os.environ['REMOTE_USER'], os.environ['AUTH_TYPE'], flush=True)\n"
                     "sys.stdin.read()\n")  # fmt: skip
    server = gsrv(term_service("shell", child, auth={"bearer": str(tokens)}))
    for hello in ({}, {"bearer": "wrong"}):
        refused = term(server, "shell", hello)
        refused.pump(lambda: False)
        assert refused.closed == (4401, "unauthorized"), refused.closed
    assert not marker.exists()  # no child started
    client = term(server, "shell", {"bearer": "first-secret-token"})
    token = answered(client)["token"]
    client.pump(lambda: b"Bearer" in client.output)
    assert b"token-1 Bearer" in client.output and marker.read_text() == "x"
    client.drop()
    server.wait_log(r"event=session_detached")
    other = term(server, "shell", {"bearer": "second-secret-token", "resume": token, "offset": 0})
    other.pump(lambda: False)
    assert other.closed == (4403, "wrong_user"), other.closed
    again = term(server, "shell", {"bearer": "first-secret-token", "resume": token, "offset": 0})
    assert answered(again)["offset"] <= len(client.output)
    assert "first-secret-token" not in "\n".join(server.lines)


@pytest.mark.timeout(60)
def test_a_detached_session_lives_through_a_reload_and_a_drain_ends_it_as_a_running_one(gsrv, term) -> None:
    server = gsrv('[server]\ndrain_timeout = "1s"\n' + term_service("shell", ["cat"]))
    first = term(server, "shell", {})
    token = answered(first)["token"]
    first.drop()
    server.wait_log(r"event=session_detached")
    server.signal(signal.SIGHUP)
    server.wait_log(r"event=reloaded")
    second = term(server, "shell", {"resume": token, "offset": 0})
    answered(second)
    second.send(b"iafter-reload\r")
    second.pump(lambda: second.output.count(b"after-reload\r\n") == 2)  # the echo, then cat's
    second.drop()
    wait_until(lambda: server.count_log(r"event=session_detached") == 2, 10, "detached again")
    server.signal(signal.SIGTERM)  # the drain waits for it (drain_timeout), then ends it as any running session
    line = server.wait_log(r"event=session_end service=shell", timeout=20)
    assert "reason=shutdown" in line and "drops=2" in line, line
    assert server.wait(30) == 0


@pytest.mark.timeout(60)
def test_the_shipped_terminal_demo_draws_top_reattaches_and_shares(gsrv, term, tmp_path) -> None:
    text = (ROOT / "conf" / "gsrv.toml").read_text()
    text = re.sub(r'listen = "127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:0"', text)
    server = gsrv(text.replace("unix:/tmp/gsrv-python.sock", f"unix:{tmp_path / 'python.sock'}"))
    first = term(server, "terminal", {})
    hello = answered(first)
    assert hello["reattach"] == 300 and hello["share"] == "read-only", hello
    first.send(b"r100x30")
    first.pump(lambda: b"load average" in first.output)
    watcher = term(server, "terminal", {"watch": hello["watch"]})
    watcher.pump(lambda: b"load average" in watcher.output)  # the kept screen, or the next redraw
    first.drop()
    second = term(server, "terminal", {"resume": hello["token"], "offset": len(first.output)})
    answered(second)
    second.pump(lambda: b"load average" in second.output)  # top's next screen, to the same session
    assert server.count_log(r"event=session_end service=terminal .*relay=") == 0
