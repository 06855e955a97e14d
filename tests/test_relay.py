"""The relay with real gsrv, real children and real sockets: exactness, backpressure, half-close."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PY, ROOT, exchange, lives, push_watching_rss, py_child, random_stream, service_toml, wait_until

from gsrv import __version__ as gsrv_version

MiB = 1024 * 1024


@pytest.fixture(params=["splice", "copy", "socket"])
def relay_path(request) -> str:
    return str(request.param)


@pytest.fixture
def gsrv(relay_path, gsrv):
    """The conftest fixture, with every service on one relay path: every path is held to
    the same exactness, half-close and cleanup guarantees."""

    relay = relay_path
    started = []

    def start(text: str, read_log: bool = True):
        text = re.sub(r"^relay = .*$", "", text, flags=re.M)  # a shipped config may set it
        if relay == "socket":  # pipes, buffers and a stdin gsrv writes, which that path has not (config errors)
            text = re.sub(r"^(pipe_size|chunk_size|prespawn|peer_line) = .*$", "", text, flags=re.M)
        text = re.sub(r"^(\[services\.[\w-]+\])$", rf'\1\nrelay = "{relay}"', text, flags=re.M)
        started.append(gsrv(text, read_log=read_log))
        return started[-1]

    yield start
    for server in started:  # every session ran on the path under test
        ends = [line for line in server.lines if re.search(r'event"?[=:] ?"?session_end', line)]
        assert all(re.search(rf'relay"?[=:] ?"?{relay}\b', line) for line in ends), ends


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sha256_of_256_mib_matches_local_digest(gsrv) -> None:
    server = gsrv(service_toml("sha", ["sha256sum"]))
    local = hashlib.sha256()
    with server.connect("sha") as sock:
        for piece in random_stream(256 * MiB):
            local.update(piece)
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.split()[0].decode() == local.hexdigest()
    server.wait_log(r"event=session_end .*bytes_in=268435456 .*reason=eof")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_echo_of_64_mib_through_cat_is_identical(gsrv) -> None:
    server = gsrv(service_toml("echo", ["cat"]))
    sent, got = hashlib.sha256(), hashlib.sha256()
    received = 0

    def push(sock: socket.socket) -> None:
        for piece in random_stream(64 * MiB, seed=7):
            sent.update(piece)
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)

    with server.connect("echo") as sock:
        sender = threading.Thread(target=push, args=(sock,))
        sender.start()
        while chunk := sock.recv(65536):
            got.update(chunk)
            received += len(chunk)
        sender.join(timeout=30)
    assert received == 64 * MiB
    assert got.hexdigest() == sent.hexdigest()


SLOW_READER = """
    import os, sys, time
    count_file = sys.argv[1]
    total = 0
    while True:
        data = os.read(0, 65536)
        if not data:
            break
        total += len(data)
        with open(count_file + ".tmp", "w") as f:
            f.write(str(total))
        os.replace(count_file + ".tmp", count_file)
        time.sleep(len(data) / 2_000_000)  # at most ~2 MB/s
"""


@pytest.mark.timeout(120)
def test_backpressure_fast_client_slow_child(gsrv, tmp_path) -> None:
    count_file = tmp_path / "child-read"
    server = gsrv(service_toml("slow", py_child(SLOW_READER) + [str(count_file)]))
    with server.connect("slow") as sock:
        sock.sendall(b"x" * 65536)
        wait_until(count_file.exists, 10, "the child to start reading")
        pushed, grew = push_watching_rss(server, sock, 10)
        accepted = 65536 + pushed
        child_read = int(count_file.read_text())
    assert grew < 16 * MiB, f"gsrv RSS grew by {grew / MiB:.1f} MiB"
    assert accepted - child_read < 16 * 10**6, f"{accepted=} {child_read=}"
    assert child_read < 40 * 10**6  # the child really was slow: the test measured backpressure


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_slow_download_keeps_memory_bounded(gsrv) -> None:
    total = 512 * MiB
    server = gsrv(service_toml("big", ["head", "-c", str(total), "/dev/zero"]))
    received = 0
    with server.connect("big") as sock:
        sock.shutdown(socket.SHUT_WR)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        received += len(sock.recv(65536))
        rss_before = server.rss()
        peak = rss_before
        slow_until = time.monotonic() + 4
        while time.monotonic() < slow_until:  # a slow reader: ~3 MB/s
            received += len(sock.recv(32768))
            time.sleep(0.01)
            peak = max(peak, server.rss())
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    assert peak - rss_before < 16 * MiB, f"gsrv RSS grew by {(peak - rss_before) / MiB:.1f} MiB"
    assert received == total


@pytest.mark.timeout(60)
def test_half_closed_client_gets_a_late_answer(gsrv) -> None:
    child = py_child("""
        import sys, time
        data = sys.stdin.buffer.read()
        time.sleep(1)
        sys.stdout.write(f"got {len(data)} bytes\\n")
    """)
    server = gsrv(service_toml("late", child))
    with server.connect("late") as sock:
        assert exchange(sock, b"a" * 1000) == b"got 1000 bytes\n"
    server.wait_log(r"event=session_end service=late .*exit=0 reason=eof")


@pytest.mark.timeout(60)
def test_client_reset_ends_the_whole_process_group(gsrv) -> None:
    # The child never reads stdin, so the upward pump parks in a write and cannot see the RST.
    server = gsrv(service_toml("stuck", ["sh", "-c", "sleep 300 | sleep 300; sleep 300"]))
    sock = server.connect("stuck")
    family = wait_until(lambda: len(server.children()) >= 3 and server.children(), 10, "sh and its two sleeps")
    pids = [p.pid for p in family]
    sock.setblocking(False)
    pushed = 0
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            pushed += sock.send(b"\0" * 65536)
        except BlockingIOError:
            break
    assert pushed > 65536
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

    def all_gone() -> bool:
        return not any(lives(pid) for pid in pids)

    wait_until(all_gone, 5, f"the process group {pids} to be gone")
    server.wait_log(r"event=session_end service=stuck .*reason=client_reset")


@pytest.mark.timeout(60)
def test_child_exits_early_client_still_gets_everything(gsrv) -> None:
    child = py_child("""
        import os, sys
        left = 1_000_000
        while left:
            left -= len(os.read(0, min(left, 65536)))
        sys.stdout.buffer.write(b"y" * (8 * 1024 * 1024))
    """)
    server = gsrv(service_toml("early", child))
    stop = threading.Event()

    def keep_sending(sock: socket.socket) -> None:
        try:
            while not stop.is_set():
                sock.sendall(b"z" * 16384)
        except OSError:
            pass

    with server.connect("early") as sock:
        sender = threading.Thread(target=keep_sending, args=(sock,), daemon=True)
        sender.start()
        received = 0
        while chunk := sock.recv(65536):  # a reset raises here
            assert chunk.count(b"y") == len(chunk)
            received += len(chunk)
            time.sleep(0.003)  # a slow reader
        stop.set()
    assert received == 8 * MiB
    sender.join(timeout=10)
    server.wait_log(r"event=session_end service=early .*bytes_out=8388608 .*reason=child_exit")


def _send(server, name: str, data: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    host, port = server.address(name)
    return subprocess.run(
        [PY, "-m", "gsrv", "send", f"{host}:{port}"],
        input=data,
        stdin=None if data is not None else subprocess.PIPE,
        capture_output=True,
        timeout=timeout,
    )


@pytest.mark.timeout(60)
def test_child_killed_mid_reply_is_a_reset(gsrv) -> None:
    script = "head -c 100000 /dev/zero; kill -KILL $$"
    server = gsrv(service_toml("dies", ["sh", "-c", script]))
    result = _send(server, "dies", b"hello")
    assert result.returncode == 1, result
    assert b"reset the connection" in result.stderr
    server.wait_log(r"event=session_end service=dies .*bytes_out=100000 .*signal=KILL reason=")


@pytest.mark.timeout(60)
def test_session_timeout_is_a_reset(gsrv) -> None:
    server = gsrv(service_toml("slowpoke", ["cat"], session_timeout="1s"))
    host, port = server.address("slowpoke")
    proc = subprocess.Popen(
        [PY, "-m", "gsrv", "send", f"{host}:{port}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(b"partial")
    proc.stdin.flush()
    assert proc.wait(timeout=20) == 1  # its stdin stays open: only gsrv can end the session
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        pipe.close()
    assert out == b"partial"
    assert b"the reply is incomplete" in err
    server.wait_log(r"event=session_end service=slowpoke .*reason=session_timeout")


@pytest.mark.timeout(60)
def test_idle_timeout_is_a_reset(gsrv) -> None:
    server = gsrv(service_toml("idle", ["cat"], idle_timeout="500ms"))
    with server.connect("idle") as sock:
        sock.sendall(b"ping")
        assert sock.recv(100) == b"ping"
        with pytest.raises(ConnectionResetError):
            while sock.recv(100):
                pass
    server.wait_log(r"event=session_end service=idle .*reason=idle_timeout")


@pytest.mark.timeout(60)
def test_nonzero_exit_close_or_reset(gsrv) -> None:
    text = service_toml("soft", ["sh", "-c", "echo out; exit 3"])
    text += service_toml("hard", ["sh", "-c", "echo out; exit 3"], nonzero_exit="reset")
    server = gsrv(text)
    soft = _send(server, "soft", b"")
    assert (soft.returncode, soft.stdout) == (0, b"out\n")
    hard = _send(server, "hard", b"")
    assert hard.returncode == 1
    server.wait_log(r"service=hard .*exit=3 reason=")


@pytest.mark.timeout(60)
def test_stderr_is_logged_capped_and_rate_limited(gsrv) -> None:
    child = py_child("""
        import sys
        sys.stderr.write("first line\\n" + "L" * 10000 + "\\n")
        for i in range(300):
            sys.stderr.write(f"noise {i}\\n")
        print("done")
    """)
    server = gsrv(service_toml("talky", child))
    assert _send(server, "talky", b"").stdout == b"done\n"
    end = server.wait_log(r"event=session_end service=talky")
    assert "stderr_dropped=" in end
    assert server.count_log(r"event=child_stderr service=talky .*line=\"first line\"") == 1
    cut = server.wait_log(r"event=child_stderr .*\[cut\]")
    assert len(cut) < 4096 + 300
    logged = server.count_log(r"event=child_stderr service=talky")
    dropped = int(end.split("stderr_dropped=")[1].split()[0])
    assert logged + dropped == 302 and logged <= 110


@pytest.mark.timeout(60)
def test_child_sees_ucspi_environment(gsrv) -> None:
    child = ["sh", "-c", 'echo "$PROTO $TCPREMOTEIP $TCPLOCALPORT $GSRV_SERVICE $GSRV_SESSION $GREETING $HOME"']
    server = gsrv(service_toml("env", child, env={"GREETING": "hi"}))
    fields = _send(server, "env", b"").stdout.decode().split()
    assert fields[:4] == ["TCP", "127.0.0.1", str(server.address("env")[1]), "env"]
    assert fields[4].split("-")[0] == str(server.proc.pid)
    assert fields[5:] == ["hi"]  # HOME is not on the default pass_env list


@pytest.mark.timeout(60)
def test_stderr_merged_or_discarded_and_json_log(gsrv) -> None:
    # The child reads to its EOF first: the reason is then eof whenever the client's FIN arrives
    # (a child that ends before it would rightly be child_exit).
    script = ["sh", "-c", "cat >/dev/null; echo to-stdout; echo to-stderr >&2"]
    text = '[server]\nlog_format = "json"\n'
    text += service_toml("merged", script, stderr="stdout") + service_toml("quiet", script, stderr="discard")
    server = gsrv(text)
    merged = _send(server, "merged", b"").stdout
    assert sorted(merged.splitlines()) == [b"to-stderr", b"to-stdout"]
    assert _send(server, "quiet", b"").stdout == b"to-stdout\n"
    line = server.wait_log(r'"event": "session_end", "service": "quiet"')
    record = json.loads(line)
    assert (record["level"], record["reason"], record["exit"], record["bytes_out"]) == ("info", "eof", 0, 10)
    assert server.count_log("to-stderr") == 0  # neither service logged the child's stderr


@pytest.mark.timeout(30)
def test_version() -> None:
    result = subprocess.run([PY, "-m", "gsrv", "--version"], capture_output=True, text=True, timeout=20)
    assert (result.returncode, result.stdout) == (0, f"gsrv {gsrv_version}\n")


@pytest.mark.timeout(60)
def test_shipped_demo_services_answer_as_the_readme_says(gsrv) -> None:
    text = (ROOT / "conf" / "gsrv.toml").read_text()
    # the pty, WebSocket, terminal and HTTP demos have their own tests (test_pty.py, test_websocket.py,
    # test_reattach.py, test_http.py)
    demos = r"(?:python|upper-ws|terminal|sha256-http|cgi)(?:\.websocket|\.http)?"
    text = re.sub(rf"^\[services\.{demos}\].*\n(?:(?!\[).*\n)*", "", text, flags=re.M)
    assert not re.search(r"^\[services\.(python|upper-ws|terminal|sha256-http|cgi)", text, flags=re.M)
    assert "[services.daemon]" in text
    server = gsrv(re.sub(r'listen = "127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:0"', text))
    readme = (ROOT / "README.md").read_bytes()
    digest = _send(server, "sha256", readme).stdout.split()[0].decode()
    assert digest == hashlib.sha256(readme).hexdigest()
    assert gzip.decompress(_send(server, "gzip", readme).stdout) == readme
    with server.connect("upper", timeout=10) as sock:  # interactive: each line comes back at once
        sock.sendall(b"hello, gsrv\n")
        assert sock.recv(100) == b"HELLO, GSRV\n"
        assert exchange(sock, b"bye\n") == b"BYE\n"


def _short_session(address: tuple[str, int]) -> bytes | None:
    """Connect, send nothing, half-close, read to the end: the reply, or None on a reset.
    (Only this thread touches the socket: a second one sending could take the reset for
    itself, and recv() would then see a plain EOF.)"""
    chunks = []
    with socket.create_connection(address, timeout=30) as sock:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # already reset
            return None
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            return None
    return b"".join(chunks)


@pytest.mark.timeout(120)
def test_exit_statuses_stay_exact_under_load(gsrv) -> None:
    # 300 children that exit 3 and 100 that kill themselves, 20 sessions at a time: each
    # status comes from gevent's child watcher, never from a waitpid that could miss it.
    text = service_toml("three", ["sh", "-c", "echo bye; exit 3"])
    text += service_toml("killed", ["sh", "-c", "kill -KILL $$"])
    server = gsrv(text)
    with ThreadPoolExecutor(20) as pool:
        threes = list(pool.map(_short_session, [server.address("three")] * 300))
        killed = list(pool.map(_short_session, [server.address("killed")] * 100))
    assert threes == [b"bye\n"] * 300  # nonzero_exit = "close": the reply, then a FIN
    assert killed == [None] * 100  # killed by a signal: a reset
    ends = "event=session_end service=three "
    wait_until(lambda: server.count_log(ends) == 300, 20, "300 session_end lines for three")
    assert server.count_log(ends + r".* exit=3 reason=(eof|child_exit)$") == 300
    ends = "event=session_end service=killed "
    wait_until(lambda: server.count_log(ends) == 100, 20, "100 session_end lines for killed")
    assert server.count_log(ends + r".* signal=KILL reason=(eof|child_exit)$") == 100
    wait_until(lambda: not server.children(), 10, "no child left")


@pytest.mark.timeout(60)
def test_pipe_size_sets_the_childs_stdin_and_stdout_pipes(gsrv, relay_path) -> None:
    if relay_path == "socket":
        pytest.skip("the child's stdin and stdout are the connection: pipe_size is a config error there")
    probe = py_child("""
        import fcntl, sys
        sizes = [fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) for fd in (0, 1)]
        print(*sizes, len(sys.stdin.buffer.read()))
    """)
    server = gsrv(service_toml("big", probe, pipe_size="256KiB") + service_toml("plain", probe))
    assert _send(server, "big", b"x" * 300000).stdout.split() == [b"262144", b"262144", b"300000"]
    assert _send(server, "plain", b"").stdout.split() == [b"65536", b"65536", b"0"]
