"""pty = true with real gsrv, real children on a real pseudo-terminal: interactive programs,
raw mode, the end of input, bounded memory, signals."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import stat
import subprocess
import termios
import threading
import time

import pytest
from conftest import PY, ROOT, push_watching_rss, py_child, random_stream, service_toml, wait_until

from gsrv.relay.childend import eof_input

MiB = 1024 * 1024

# A child that puts its terminal in raw mode, says so, then echoes exactly N bytes back.
RAW_ECHO = """
import os, sys, tty
tty.setraw(0)
os.write(1, b"raw\\n")
left = int(sys.argv[1])
while left:
    data = os.read(0, min(65536, left))
    if not data:
        break
    left -= len(data)
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
"""

RAW_MUTE = """
import os, time, tty
tty.setraw(0)
os.write(1, b"raw\\n")
time.sleep(60)
"""


def read_until(sock: socket.socket, pattern: bytes, timeout: float = 20.0) -> bytes:
    """What the client received until pattern (a regex) matched it."""
    got = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, got):
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} within {timeout}s; got {got!r}"
        sock.settimeout(left)
        chunk = sock.recv(65536)
        assert chunk, f"EOF before {pattern!r}; got {got!r}"
        got += chunk
    return got


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.timeout(60)
def test_python_without_u_shows_its_prompt_and_answers(gsrv) -> None:
    server = gsrv(service_toml("repl", [PY], pty=True))
    with server.connect("repl") as sock:
        banner = read_until(sock, rb">>> $")
        assert b"Python 3" in banner
        sock.sendall(b"print(6*7)\n")
        answer = read_until(sock, rb"42\r\n>>> $")
        assert answer.startswith(b"print(6*7)\r\n")  # the terminal echoes what was typed
        sock.sendall(b"import os; print(os.environ['TERM'], os.isatty(2))\n")
        read_until(sock, rb"xterm-256color True\r\n>>> $")
        sock.sendall(b"raise SystemExit(0)\n")
        sock.settimeout(20)
        read_all(sock)
    line = server.wait_log(r"event=session_end service=repl ")
    assert "relay=pty" in line and "exit=0" in line


@pytest.mark.timeout(60)
def test_tty_through_it_prints_a_dev_pts_path(gsrv) -> None:
    server = gsrv(service_toml("tty", ["tty"], pty=True))
    with server.connect("tty") as sock:
        reply = read_all(sock)
    assert re.fullmatch(rb"/dev/pts/\d+\r\n", reply), reply
    assert "exit=0" in server.wait_log(r"event=session_end service=tty ")


@pytest.mark.timeout(120)
def test_a_raw_mode_child_returns_32_mib_exact(gsrv) -> None:
    total = 32 * MiB
    server = gsrv(service_toml("raw", py_child(RAW_ECHO) + [str(total)], pty=True))
    sent = hashlib.sha256()
    with server.connect("raw") as sock:
        read_until(sock, rb"^raw\n$")  # raw: no ONLCR either

        def send() -> None:
            for piece in random_stream(total):
                sent.update(piece)
                sock.sendall(piece)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got, received = hashlib.sha256(), 0
        sock.settimeout(30)
        while received < total:
            chunk = sock.recv(1 << 20)
            assert chunk, f"EOF after {received} of {total} bytes"
            got.update(chunk)
            received += len(chunk)
        sender.join(timeout=30)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""
    assert got.hexdigest() == sent.hexdigest()
    line = server.wait_log(r"event=session_end service=raw ")
    assert f"bytes_in={total} " in line and f"bytes_out={total + 4} " in line and "exit=0" in line


@pytest.mark.timeout(60)
def test_memory_stays_bounded_while_a_pty_child_does_not_read(gsrv) -> None:
    server = gsrv(service_toml("mute", py_child(RAW_MUTE), pty=True))
    with server.connect("mute") as sock:
        read_until(sock, rb"^raw\n$")
        accepted, grew = push_watching_rss(server, sock, 5)
    assert grew < 16 * MiB, f"gsrv RSS grew by {grew / MiB:.1f} MiB"
    # what the kernel's socket buffers and the terminal hold, and one chunk: nothing like 5 s of a fast client
    assert accepted < 16 * MiB, accepted


@pytest.mark.timeout(60)
def test_a_pty_child_killed_by_sigkill_logs_signal_kill(gsrv) -> None:
    server = gsrv(service_toml("sleep", ["sleep", "60"], pty=True))
    with server.connect("sleep") as sock:
        procs = wait_until(lambda: [p for p in server.children() if p.name() == "sleep"], 10, "the sleep child")
        assert isinstance(procs, list)
        procs[0].send_signal(signal.SIGKILL)
        sock.settimeout(20)
        with pytest.raises(ConnectionResetError):
            read_all(sock)
    line = server.wait_log(r"event=session_end service=sleep ")
    assert "signal=KILL" in line and "relay=pty" in line, line


@pytest.mark.timeout(60)
def test_the_eof_character_ends_cat_in_canonical_mode(gsrv) -> None:
    server = gsrv(service_toml("cat", ["cat"], pty=True))
    with server.connect("cat") as sock:
        sock.sendall(b"hello\nworld")  # a partial line last: two EOF characters end it
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(20)
        reply = read_all(sock)
    # the terminal's echo of both lines, and cat's copy: the partial line reached cat too
    assert reply.count(b"hello\r\n") == 2 and reply.count(b"world") == 2, reply
    line = server.wait_log(r"event=session_end service=cat ")
    assert "reason=eof" in line and "exit=0" in line, line


@pytest.mark.timeout(60)
def test_a_raw_mode_child_that_ignores_the_end_of_input_is_hung_up(gsrv) -> None:
    server = gsrv('[server]\neof_grace = "500ms"\n' + service_toml("mute", py_child(RAW_MUTE), pty=True))
    with server.connect("mute") as sock:
        read_until(sock, rb"^raw\n$")
        started = time.monotonic()
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(20)
        assert read_all(sock) == b""  # a FIN: the hangup is the end of input a raw terminal has
        took = time.monotonic() - started
    assert took > 0.4, took  # not before eof_grace (500 ms); its deadline is the test's
    line = server.wait_log(r"event=session_end service=mute ")
    assert "reason=hangup" in line and "signal=HUP" in line, line


@pytest.mark.timeout(60)
def test_a_hangup_never_reaches_gsrvs_own_group(gsrv) -> None:
    """A child that gave its terminal up (TIOCNOTTY) leaves it no foreground group: tcgetpgrp
    then says 0, and killpg(0) would be gsrv's own group (a reload, at least)."""
    code = """
    import fcntl, os, signal, termios, time, tty
    tty.setraw(0)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    fcntl.ioctl(0, termios.TIOCNOTTY)
    os.write(1, b"raw\\n")
    time.sleep(2)
    """
    server = gsrv(
        '[server]\neof_grace = "300ms"\nkill_grace = "1s"\n' + service_toml("notty", py_child(code), pty=True)
    )
    with server.connect("notty") as sock:
        read_until(sock, rb"^raw\n$")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(20)
        read_all(sock)
    assert "reason=hangup" in server.wait_log(r"event=session_end service=notty ")
    assert server.count_log(r"event=signal ") == 0, server.lines[-5:]


@pytest.mark.timeout(60)
def test_a_pty_child_in_the_sandbox_has_it_as_its_controlling_terminal(gsrv) -> None:
    # tcgetpgrp answers only on the caller's controlling terminal (else ENOTTY)
    code = "import os; print(os.isatty(0), os.tcgetpgrp(0) == os.getpgrp())"
    server = gsrv(service_toml("sb", ["python3", "-c", code], pty=True, sandbox={"private_tmp": True}))
    with server.connect("sb") as sock:
        assert read_all(sock) == b"True True\r\n"


@pytest.mark.timeout(60)
def test_the_shipped_python_demo_through_gsrv_send_raw_from_a_terminal(gsrv, tmp_path) -> None:
    """As the README says: `gsrv send --raw unix:...` typed at a terminal (a pty here)."""
    text = (ROOT / "conf" / "gsrv.toml").read_text()
    text = re.sub(r'listen = "127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:0"', text)
    sock_path = tmp_path / "python.sock"
    assert 'listen = "unix:/tmp/gsrv-python.sock"' in text
    server = gsrv(text.replace('listen = "unix:/tmp/gsrv-python.sock"', f'listen = "unix:{sock_path}"'))
    server.wait_log(r"event=listening service=python ")
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    client = subprocess.Popen([PY, "-m", "gsrv", "send", "--raw", f"unix:{sock_path}"], stdin=slave, stdout=slave,
                              stderr=subprocess.PIPE, cwd=ROOT)  # fmt: skip
    try:
        typed = b""

        def screen(pattern: bytes) -> None:
            nonlocal typed
            deadline = time.monotonic() + 20
            while not re.search(pattern, typed):
                assert time.monotonic() < deadline, f"no {pattern!r} on the screen: {typed!r}"
                typed += os.read(master, 4096)

        screen(rb">>> $")  # python3 -q: the prompt and nothing else
        wait_until(lambda: not termios.tcgetattr(slave)[3] & termios.ICANON, 10, "the local terminal in raw mode")
        os.write(master, b"print(6*7)\r")  # Enter sends CR: the remote terminal makes it a newline
        screen(rb"print\(6\*7\)\r\n42\r\n>>> $")
        os.write(master, b"\x04")  # ^D at the prompt: Python's EOF, the session ends
        assert client.wait(timeout=20) == 0, client.stderr.read() if client.stderr else ""
        assert termios.tcgetattr(slave) == before  # the local terminal as it was
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=5)
        if client.stderr:
            client.stderr.close()
        os.close(master)
        os.close(slave)
    line = server.wait_log(r"event=session_end service=python ")
    assert "exit=0" in line and "relay=pty" in line, line


def test_eof_input_is_the_eof_character_once_or_twice_and_nothing_in_raw_mode() -> None:
    cc = [b"\0"] * termios.NCCS
    cc[termios.VEOF] = b"\x04"
    canonical = [termios.ICRNL, 0, 0, termios.ICANON | termios.ECHO, 0, 0, cc]
    assert eof_input(canonical, b"") == b"\x04"
    assert eof_input(canonical, b"\n") == b"\x04"
    assert eof_input(canonical, b"\r") == b"\x04"  # ICRNL: a carriage return ends a line too
    assert eof_input(canonical, b"x") == b"\x04\x04"
    raw = [0, 0, 0, termios.ECHO, 0, 0, cc]
    assert eof_input(raw, b"x") == b""
    disabled = [*canonical[:6], [b"\0"] * termios.NCCS]
    assert eof_input(disabled, b"x") == b""
