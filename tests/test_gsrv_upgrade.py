"""`gsrv upgrade` (issue 38): the running gsrv re-execs itself in place, its listeners and its
`relay = "socket"` sessions kept (the same gsrv PID, the same child, every byte once); what
cannot move ends with reason=shutdown upgrade=1; a broken new code or config refuses the upgrade
and gsrv serves on. Also `gsrv upgrade --check` on its own, the record on an inherited fd."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import PY, random_stream, service_toml, tls_files, wait_until
from termclient import answered
from test_http import bodies_of

from gsrv.spawn import wire
from gsrv.upgrade.record import Record, write

GOOD = '[services.echo]\nlisten = "127.0.0.1:0"\ncommand = ["cat"]\n'
SERVED = """
[server]
kill_grace = "1s"
upgrade_wait = "1s"
[admin]
listen = "127.0.0.1:0"
[services.handed]
listen = "127.0.0.1:0"
command = ["cat"]
relay = "socket"
[services.piped]
listen = "127.0.0.1:0"
command = ["cat"]
relay = "splice"
[services.copied]
listen = "127.0.0.1:0"
command = ["cat"]
relay = "copy"
[services.terminal]
listen = "127.0.0.1:0"
command = ["cat"]
pty = true
[services.web]
listen = "127.0.0.1:0"
command = ["sh", "-c", 'printf "Content-Type: text/plain\\r\\n\\r\\n%s" "$QUERY_STRING"']
transport = "http"
"""
CHUNK = 64 * 1024


def admin_of(server) -> str:  # type: ignore[no-untyped-def]
    line = server.wait_log(r"event=admin_listening address=\S+")
    return line.split("address=")[1].split()[0]


def upgrade(server, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """`gsrv upgrade` as an operator runs it, against this gsrv's admin listener."""
    return subprocess.run([PY, "-m", "gsrv", "upgrade", "-c", str(server.config), "--admin", admin_of(server), *args],
                          capture_output=True, text=True, timeout=150)  # fmt: skip


def sessions(server) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    with urllib.request.urlopen(f"http://{admin_of(server)}/sessions", timeout=30) as reply:
        found: list[dict[str, object]] = json.loads(reply.read())["sessions"]
        return found


def running_child(server) -> object:  # type: ignore[no-untyped-def]
    """The one session's child pid, once gsrv lists it (a socket-handoff child may answer its
    client before gsrv has read the spawner's answer)."""
    wait_until(lambda: sessions(server), 30, "the session listed")
    return sessions(server)[0]["pid"]


class Stream:
    """A paced stream of known bytes to one connection and its echo back: digests both ways,
    and the largest gap between received bytes (the pause an upgrade cost the client)."""

    def __init__(self, sock: socket.socket, pace_s: float = 0.005) -> None:
        self.sock, self.pace_s = sock, pace_s
        self.sent, self.received = hashlib.sha256(), hashlib.sha256()
        self.sent_bytes = self.received_bytes = 0
        self.largest_gap = 0.0
        self.enough = threading.Event()
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._sender.start()
        self._receiver.start()

    def _send(self) -> None:
        for piece in random_stream(1 << 30, chunk=CHUNK):  # bounded: 1 GiB at most
            if self.enough.is_set():
                break
            self.sock.sendall(piece)
            self.sent.update(piece)
            self.sent_bytes += len(piece)
            time.sleep(self.pace_s)
        self.sock.shutdown(socket.SHUT_WR)

    def _receive(self) -> None:
        last = time.monotonic()
        while data := self.sock.recv(1 << 20):
            now = time.monotonic()
            self.largest_gap = max(self.largest_gap, now - last)
            last = now
            self.received.update(data)
            self.received_bytes += len(data)

    def finish(self) -> None:
        self.enough.set()
        self._sender.join(timeout=60)
        self._receiver.join(timeout=60)
        assert not self._receiver.is_alive(), "the echo never ended"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("service", ["handed", "piped", "copied"])
def test_a_session_moves_across_three_upgrades_with_every_byte_once(gsrv, service: str) -> None:  # type: ignore[no-untyped-def]
    """Each path that moves (socket, splice, copy): the same gsrv, the same child, the same
    session, every byte once, one session_end line with the whole session's bytes."""
    server = gsrv(SERVED)
    sock = server.connect(service, timeout=60)
    stream = Stream(sock)
    child = running_child(server)
    for n in range(1, 4):
        done = upgrade(server)
        assert done.returncode == 0, (done.stdout, done.stderr, server.lines[-20:])
        assert f"upgraded: upgrade {n}" in done.stdout and "1 session(s) moved" in done.stdout, done.stdout
        assert server.proc.poll() is None
        moved = sessions(server)
        assert [s["pid"] for s in moved] == [child], moved  # the same child, the same session
    stream.finish()
    sock.close()
    print(f"streamed {stream.sent_bytes} bytes; the client's largest gap between received bytes: "
          f"{stream.largest_gap * 1000:.1f} ms")  # fmt: skip
    assert stream.received_bytes == stream.sent_bytes and stream.received.digest() == stream.sent.digest()
    line = server.wait_log(rf"event=session_end service={service}")
    assert f"bytes_in={stream.sent_bytes} bytes_out={stream.sent_bytes}" in line and "reason=eof" in line, line
    assert server.count_log(r"event=session_end") == 1
    assert server.count_log(r"event=upgrade upgrade=\d result=ok .*moved=1 lost=0") == 3
    assert server.count_log(r"event=spawner_started") == 1  # the running spawner was kept


@pytest.mark.timeout(120)
def test_what_cannot_move_ends_with_upgrade_1_and_new_clients_wait_in_the_backlog(gsrv) -> None:  # type: ignore[no-untyped-def]
    server = gsrv(SERVED)
    piped = server.connect("terminal")  # a pty session does not move (yet): it ends, upgrade=1
    piped.sendall(b"before\n")
    assert b"before" in piped.recv(100)
    failures: list[str] = []
    served = [0]
    stop = threading.Event()

    def knock() -> None:  # new clients through the whole upgrade: none refused, each served
        while not stop.is_set():
            try:
                with server.connect("handed") as sock:
                    sock.sendall(b"x")
                    sock.shutdown(socket.SHUT_WR)
                    if sock.recv(10) != b"x":
                        failures.append("no echo")
                    served[0] += 1
            except OSError as e:
                failures.append(repr(e))
            time.sleep(0.02)

    knocker = threading.Thread(target=knock, daemon=True)
    knocker.start()
    done = upgrade(server)
    time.sleep(0.5)
    stop.set()
    knocker.join(timeout=60)
    assert done.returncode == 0 and "1 ended" in done.stdout, (done.stdout, done.stderr)
    line = server.wait_log(r"event=session_end service=terminal")
    assert "reason=shutdown upgrade=1" in line, line
    assert failures == [] and served[0] > 0, (failures, served)
    assert server.wait_log(r"event=upgrade upgrade=1 result=ok")
    piped.close()


@pytest.mark.timeout(120)
def test_a_broken_config_or_new_code_refuses_the_upgrade_and_gsrv_serves_on(gsrv, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = gsrv(SERVED)
    held = server.connect("handed")
    held.sendall(b"one\n")
    assert held.recv(100) == b"one\n"
    good = server.config.read_text()
    server.config.write_text(good.replace('upgrade_wait = "1s"', 'upgrade_wait = "soon"'))
    refused = upgrade(server)  # the command reads the file too (for the admin listener): it says so first
    assert refused.returncode == 2 and "upgrade_wait" in refused.stderr and "soon" in refused.stderr, refused.stderr
    asked = urllib.request.Request(f"http://{admin_of(server)}/upgrade", data=b"{}", method="POST",
                                   headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as answer:  # gsrv's own check refuses it, the key named
        urllib.request.urlopen(asked, timeout=90)
    assert answer.value.code == 409
    why = json.loads(answer.value.read())["why"]
    assert "upgrade_wait" in why and "soon" in why, why
    server.config.write_text(good)
    broken = tmp_path / "new-gsrv"
    broken.write_text(f"#!{sys.executable}\nraise ImportError('made for the test: the new code cannot import')\n")
    broken.chmod(0o755)
    failed = upgrade(server, "--exec", str(broken))
    assert failed.returncode == 1 and "made for the test" in failed.stderr, failed.stderr
    held.sendall(b"two\n")  # the session never noticed
    assert held.recv(100) == b"two\n"
    with server.connect("handed") as fresh:
        fresh.sendall(b"new")
        fresh.shutdown(socket.SHUT_WR)
        assert fresh.recv(10) == b"new"
    held.close()
    assert server.count_log(r"event=upgrade upgrade=\d result=refused") == 2
    assert server.count_log(r"event=upgrade_exec") == 0
    with urllib.request.urlopen(f"http://{admin_of(server)}/metrics", timeout=30) as reply:
        assert 'gsrv_upgrades_total{result="refused"} 2.0' in reply.read().decode()


@pytest.mark.timeout(120)
def test_a_kept_alive_http_connection_asking_every_10_ms_is_never_closed_across_an_upgrade(gsrv) -> None:  # type: ignore[no-untyped-def]
    """A request in flight finishes first; the connection between requests (or its next request,
    unread at the waiting gate) moves: every response correct, the connection never closed."""
    server = gsrv(SERVED)
    answers: list[bytes] = []
    stop = threading.Event()
    problems: list[str] = []

    def ask() -> None:
        with server.connect("web") as sock:
            n = 0
            while not stop.is_set() and n < 5000:  # bounded: 50 s at 10 ms
                n += 1
                sock.sendall(b"GET /?%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % n)
                reply = b""
                while not bodies_of(reply):
                    data = sock.recv(4096)
                    if not data:
                        problems.append(f"closed after {n - 1} responses")
                        return
                    reply += data
                if not reply.startswith(b"HTTP/1.1 200 OK") or bodies_of(reply) != [b"%d" % n]:
                    problems.append(f"request {n}: {reply!r}")
                answers.append(reply)
                time.sleep(0.01)

    client = threading.Thread(target=ask, daemon=True)
    client.start()
    deadline = time.monotonic() + 20
    while len(answers) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = len(answers)
    done = upgrade(server)
    assert done.returncode == 0, (done.stdout, done.stderr)
    after = len(answers)
    while len(answers) < after + 20 and time.monotonic() < deadline + 30 and not problems:
        time.sleep(0.05)
    stop.set()
    client.join(timeout=30)
    assert problems == [] and before >= 20 and len(answers) >= after + 20, (problems, before, after, len(answers))
    assert "ended=0" in server.wait_log(r"event=upgrade upgrade=1 result=ok"), server.lines[-5:]
    assert server.count_log(r"service=web .*reason=shutdown") == 0


@pytest.mark.timeout(120)
def test_a_tls_session_finishes_within_upgrade_wait_or_ends_as_a_drain_ends_it(gsrv, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Choice (a): TLS state cannot move, so the upgrade waits upgrade_wait for TLS sessions; one
    that ends meanwhile ends as usual, one still running is ended (reason=shutdown upgrade=1)."""
    _, tls = tls_files(tmp_path)
    server = gsrv('[server]\nkill_grace = "1s"\nupgrade_wait = "5s"\n[admin]\nlisten = "127.0.0.1:0"\n'
                  + service_toml("secure", ["cat"], tls=tls))  # fmt: skip
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    finishing = context.wrap_socket(server.connect("secure"), server_hostname="127.0.0.1")
    staying = context.wrap_socket(server.connect("secure"), server_hostname="127.0.0.1", suppress_ragged_eofs=False)
    for sock in (finishing, staying):
        sock.sendall(b"hello\n")
        assert sock.recv(100) == b"hello\n"
    start = len(server.lines)
    asked = threading.Thread(target=lambda: results.append(upgrade(server)), daemon=True)
    results: list[subprocess.CompletedProcess[str]] = []
    asked.start()
    server.wait_log(r"event=upgrade_checked", start=start, timeout=60)  # settling: TLS sessions get upgrade_wait
    finishing.sendall(b"bye\n")
    assert finishing.recv(100) == b"bye\n"
    finishing.unwrap().close()  # close_notify, then the FIN: its input ended, its child exits
    asked.join(timeout=90)
    assert results and results[0].returncode == 0 and "1 ended" in results[0].stdout, results
    ends = [line for line in server.lines if "event=session_end service=secure" in line]
    assert len(ends) == 2, ends
    assert "reason=eof" in ends[0] and "upgrade=1" not in ends[0], ends
    assert "reason=shutdown upgrade=1" in ends[1] and "tls=TLSv1.3" in ends[1], ends
    with pytest.raises((ssl.SSLError, OSError)):  # cut (a reset, no close_notify): never a clean end
        staying.recv(100)  # (a close_notify would read as b"": ragged EOFs are not suppressed here)
    staying.close()


TERMINAL = """
[server]
kill_grace = "1s"
[admin]
listen = "127.0.0.1:0"
[services.shell]
listen = "127.0.0.1:0"
command = ["sh", "-i"]
transport = "websocket"
pty = true
[services.shell.websocket]
reattach = "1m"
share = "read-only"
"""


@pytest.mark.timeout(120)
def test_a_terminal_session_is_detached_by_the_upgrade_and_reattached_with_its_shell(gsrv, term) -> None:  # type: ignore[no-untyped-def]
    """The terminal page's session with reattach: its connection closes at the exec (no close
    frame: the page reconnects), the session moves detached, the page's token and offset take it
    back: the same shell (`echo $$` the same pid), no byte lost or doubled; a watcher rejoins."""
    server = gsrv(TERMINAL)
    page = term(server, "shell", {})
    answer = answered(page)
    page.send(b"iecho pid=$$\r")
    page.pump(lambda: re.search(rb"pid=(\d+)\r\n", bytes(page.output)) is not None)
    before = re.search(rb"pid=(\d+)\r\n", bytes(page.output))
    assert before is not None
    watcher = term(server, "shell", {"watch": answer["watch"]})
    answered(watcher)
    done = upgrade(server)
    assert done.returncode == 0 and "1 session(s) moved" in done.stdout, (done.stdout, done.stderr)
    page.pump(lambda: False, timeout=30)  # the exec closed it: no close frame (a page reconnects on 1006)
    assert page.closed is None
    offset = len(page.output)
    again = term(server, "shell", {"resume": answer["token"], "offset": offset})
    assert answered(again)["offset"] == offset
    again.send(b"iecho pid=$$ again\r")
    again.pump(lambda: b" again\r\n" in again.output and re.search(rb"pid=\d+ again\r\n", bytes(again.output)))
    after = re.search(rb"pid=(\d+) again\r\n", bytes(again.output))
    assert after is not None and after.group(1) == before.group(1), (bytes(page.output), bytes(again.output))
    watching = term(server, "shell", {"watch": answer["watch"]})
    watching.pump(lambda: b" again\r\n" in watching.output)  # a watcher rejoins with its token and streams on
    server.wait_log(r"event=session_reattached ")
    assert server.count_log(r"event=session_end service=shell") == 0
    again.send(b"iexit\r")
    again.pump(lambda: False, timeout=30)
    assert again.closed is not None and again.closed[0] == 1000, again.closed


BROKEN_NEW_CODE = """#!{python}
import sys

sys.path.insert(0, {root!r})
if sys.argv[1:2] == ["serve"]:  # the check passes: the new code breaks after the exec
    from gsrv.upgrade import record, take

    def broken(*args, **kwargs):
        raise record.RecordError("made for the test: the new code fails {where}")

    {patch}
from gsrv.cli import main

raise SystemExit(main())
"""
BREAKS = {"in the state reader": "take.read = broken", "mid-takeover": "take.Taken.spawner = broken"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", list(BREAKS))
def test_a_takeover_that_fails_after_the_exec_falls_back_to_the_previous_code(gsrv, tmp_path: Path, where: str) -> None:  # type: ignore[no-untyped-def]
    """New code (--exec) that passes the check but fails after the exec: the previous code takes
    over again from the same record, at the same PID; the session never noticed."""
    server = gsrv(SERVED)
    held = server.connect("handed")
    held.sendall(b"one\n")
    assert held.recv(100) == b"one\n"
    child = running_child(server)
    broken = tmp_path / "new-gsrv"
    root = str(Path(__file__).resolve().parent.parent)
    broken.write_text(BROKEN_NEW_CODE.format(python=sys.executable, root=root, where=where, patch=BREAKS[where]))
    broken.chmod(0o755)
    failed = upgrade(server, "--exec", str(broken))
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert f"made for the test: the new code fails {where}" in failed.stderr, failed.stderr
    assert "the previous code took over again" in failed.stderr, failed.stderr
    server.wait_log(r"event=upgrade_takeover_failed .*made for the test")
    assert server.proc.poll() is None
    assert [s["pid"] for s in sessions(server)] == [child]
    held.sendall(b"two\n")
    assert held.recv(100) == b"two\n"
    held.close()
    assert server.count_log(r"reason=upgrade_failed") == 0


@pytest.mark.timeout(120)
def test_a_takeover_that_fails_with_no_previous_code_accounts_for_every_session(gsrv, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """New code that fails mid-takeover with no previous code to return to (as after an upgrade
    of the installed code: the old is gone from disk): each session is logged as ended
    (reason=upgrade_failed), gsrv exits 1, and the guardian ends the sessions' processes."""
    server = gsrv(SERVED)
    held = server.connect("handed")
    held.sendall(b"one\n")
    assert held.recv(100) == b"one\n"
    child = int(str(running_child(server)))
    broken = tmp_path / "new-gsrv"
    root = str(Path(__file__).resolve().parent.parent)
    patch = 'take.Taken.spawner = broken\n    import os\n\n    os.environ.pop("GSRV_UPGRADE_PREVIOUS")'
    broken.write_text(BROKEN_NEW_CODE.format(python=sys.executable, root=root, where="mid-takeover", patch=patch))
    broken.chmod(0o755)
    failed = upgrade(server, "--exec", str(broken))
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert server.wait(timeout=60) == 1
    line = server.wait_log(r"event=session_end service=handed .*reason=upgrade_failed")
    assert "made for the test" in line, line
    wait_until(lambda: gone(child), 30, "the guardian to end the session's child")
    held.close()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(60)
def test_an_upgrade_is_refused_while_gsrv_announces_its_stop(gsrv) -> None:  # type: ignore[no-untyped-def]
    server = gsrv(SERVED.replace('upgrade_wait = "1s"', 'upgrade_wait = "1s"\ndrain_announce = "20s"'))
    server.signal(signal.SIGTERM)
    server.wait_log(r"event=announcing")
    asked = urllib.request.Request(f"http://{admin_of(server)}/upgrade", data=b"{}", method="POST",
                                   headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(asked, timeout=30)
    assert answer.value.code == 409
    assert json.loads(answer.value.read())["why"] == "gsrv is announcing: an upgrade needs a serving gsrv"
    server.wait_log(r"event=upgrade result=refused why=.*announcing")


@pytest.mark.timeout(120)
def test_sigusr2_upgrades_and_signals_sent_meanwhile_are_handled_after(gsrv) -> None:  # type: ignore[no-untyped-def]
    server = gsrv(SERVED)
    held = server.connect("handed")
    held.sendall(b"one\n")
    assert held.recv(100) == b"one\n"
    paused = urllib.request.Request(f"http://{admin_of(server)}/services/piped/pause", data=b"{}", method="POST",
                                    headers={"Content-Type": "application/json"})  # fmt: skip
    urllib.request.urlopen(paused, timeout=30).close()
    start = len(server.lines)
    server.signal(signal.SIGUSR2)
    server.wait_log(r"event=upgrade_exec", start=start, timeout=60)
    for _ in range(5):  # blocked from the exec until the new code's handlers are in: none is lost, none kills it
        server.signal(signal.SIGHUP)
        server.signal(signal.SIGUSR1)
    line = server.wait_log(r"event=upgrade upgrade=1 result=ok .*moved=1", start=start, timeout=60)
    assert "largest_pause_ms=0.0" in line, line  # a socket handoff's bytes never stopped
    server.wait_log(r"event=reloaded", start=start, timeout=30)
    server.wait_log(r"event=dump|idle_workers=", start=start, timeout=30)
    assert server.proc.poll() is None
    held.sendall(b"two\n")
    assert held.recv(100) == b"two\n"
    held.close()
    with urllib.request.urlopen(f"http://{admin_of(server)}/services", timeout=30) as reply:
        states = {s["name"]: s for s in json.loads(reply.read())["services"]}
    assert "paused_by_admin" in str(states["piped"]), states["piped"]  # the operator's pause goes on


@pytest.mark.timeout(60)
def test_the_check_runs_as_its_own_process_with_the_record_on_an_inherited_fd(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "gsrv.toml"
    config.write_text(GOOD)
    fd = write(Record(executable=sys.executable, argv=(sys.executable,), gsrv_version="0.1.0", config=str(config),
                      fds={"spawner": 6}, state={"spawner": {"wire": wire.VERSION}}))  # fmt: skip
    try:
        run = subprocess.run([sys.executable, "-m", "gsrv", "upgrade", "--check", "--record-fd", str(fd)],
                             pass_fds=(fd,), capture_output=True, text=True, timeout=50)  # fmt: skip
        assert run.returncode == 0 and run.stdout.startswith("upgrade_check ok: "), (run.stdout, run.stderr)
        gone = re.sub(r"\[services\.echo\]", "[services.other]", GOOD)
        busy = write(Record(executable=sys.executable, argv=(sys.executable,), gsrv_version="0.1.0",
                            config=str(config), state={"spawner": {"wire": wire.VERSION},
                                                       "busy_services": ["echo"]}))  # fmt: skip
        config.write_text(gone)
        try:
            run = subprocess.run([sys.executable, "-m", "gsrv", "upgrade", "--check", "--record-fd", str(busy)],
                                 pass_fds=(busy,), capture_output=True, text=True, timeout=50)  # fmt: skip
        finally:
            os.close(busy)
        assert run.returncode == 2 and "has no service echo, which has running sessions" in run.stdout, run.stdout
    finally:
        os.close(fd)
