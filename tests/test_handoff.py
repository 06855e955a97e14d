"""Socket handoff (relay = "socket") with real gsrv, real inetd programs and real sockets:
the child holds the connection, gsrv still decides how it ends and reads its figures from
the kernel. (The relay suite in test_relay.py runs on this path too.)"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import trustme
from conftest import PY, Gsrv, lives, py_child, random_stream, service_toml, wait_until

from gsrv.contain.host import discover

MiB = 1024 * 1024


def _session_end(server: Gsrv, service: str) -> dict[str, str]:
    line = server.wait_log(rf"event=session_end service={service} ", timeout=20)
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def _tree_digest(root: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while block := f.read(MiB):
                    digest.update(block)
            digests[str(path.relative_to(root))] = digest.hexdigest()
    return digests


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed (.ci/run installs it)")
def test_rsync_daemon_in_inetd_mode_serves_a_pull_and_a_push(gsrv, tmp_path: Path) -> None:
    served, pushed_from, pulled = tmp_path / "served", tmp_path / "local", tmp_path / "pulled"
    (served / "sub").mkdir(parents=True)
    with (served / "big.bin").open("wb") as f:
        for piece in random_stream(100 * MiB, seed=11):
            f.write(piece)
    (served / "sub" / "small.txt").write_text("a small file\n")
    shutil.copytree(served, pushed_from)
    (pushed_from / "sub" / "only-pushed.txt").write_text("pushed\n")
    conf = tmp_path / "rsyncd.conf"
    conf.write_text(
        f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\nlog file = {tmp_path / 'rsyncd.log'}\n"
        f"[module]\npath = {served}\nread only = false\n"
    )
    server = gsrv(service_toml("rsync", ["rsync", "--daemon", f"--config={conf}"], relay="socket"))
    port = server.address("rsync")[1]

    def rsync(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["rsync", "-a", *args], capture_output=True, text=True, timeout=120)

    pull = rsync(f"rsync://127.0.0.1:{port}/module/", f"{pulled}/")
    assert pull.returncode == 0, pull.stderr
    assert _tree_digest(pulled) == _tree_digest(served)
    end = _session_end(server, "rsync")
    assert (end["relay"], end["exit"]) == ("socket", "0"), end  # the daemon may end before its client: child_exit
    assert int(end["bytes_out"]) > 100 * MiB
    push = rsync(f"{pushed_from}/", f"rsync://127.0.0.1:{port}/module/pushed/")
    assert push.returncode == 0, push.stderr
    assert _tree_digest(served / "pushed") == _tree_digest(pushed_from)
    ends = r"event=session_end service=rsync .*exit=0 reason=(eof|child_exit)$"
    wait_until(lambda: server.count_log(ends) == 2, 10, "2 session_end lines, both exit=0")


@pytest.mark.timeout(60)
def test_the_child_sees_its_client_with_getpeername_0(gsrv) -> None:
    child = py_child("""
        import socket
        host, port = socket.socket(fileno=0).getpeername()[:2]
        print(host, port, flush=True)
    """)
    server = gsrv(service_toml("peer", child, relay="socket"))
    with server.connect("peer") as sock:
        sock.shutdown(socket.SHUT_WR)
        reply = sock.recv(100).decode().split()
        assert reply == ["127.0.0.1", str(sock.getsockname()[1])]
        assert sock.recv(100) == b""


@pytest.mark.timeout(60)
def test_a_child_that_half_closes_answers_with_a_fin_and_reads_the_rest(gsrv, tmp_path: Path) -> None:
    count = tmp_path / "read"
    child = py_child(f"""
        import os, socket
        conn = socket.socket(fileno=0)
        first = conn.recv(6)
        conn.sendall(b"reply to " + first)
        conn.shutdown(socket.SHUT_WR)
        total = len(first)
        while data := conn.recv(65536):
            total += len(data)
        open({str(count)!r}, "w").write(str(total))
    """)
    server = gsrv(service_toml("half", child, relay="socket"))
    stop, sent = threading.Event(), [6]
    with server.connect("half") as sock:
        sock.sendall(b"hello\n")

        def keep_sending() -> None:
            while not stop.is_set():
                sent[0] += sock.send(b"z" * 4096)
                time.sleep(0.002)

        sender = threading.Thread(target=keep_sending)
        sender.start()
        reply = b""
        while chunk := sock.recv(100):  # the child's FIN ends this while the client still sends
            reply += chunk
        time.sleep(0.2)
        stop.set()
        sender.join(timeout=10)
        sock.shutdown(socket.SHUT_WR)
        wait_until(count.exists, 10, "the child to read to the client's EOF")
    assert reply == b"reply to hello\n"
    assert int(count.read_text()) == sent[0] > 6
    end = _session_end(server, "half")
    assert (end["reason"], end["bytes_in"], end["bytes_out"]) == ("eof", str(sent[0]), str(len(reply))), end


PROXY_V1 = b"PROXY TCP4 192.0.2.7 192.0.2.9 4321 80\r\n"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("header", [b"", PROXY_V1], ids=["plain", "proxy"])
def test_bytes_in_and_out_are_exact_for_64_mib_each_way(gsrv, header: bytes) -> None:
    keys = {"proxy_protocol": "v1", "proxy_trusted": ["127.0.0.1/32"]} if header else {}
    server = gsrv(service_toml("echo", ["cat"], relay="socket", **keys))
    sent, got, received = hashlib.sha256(), hashlib.sha256(), 0
    with server.connect("echo") as sock:
        sock.sendall(header)

        def push() -> None:
            for piece in random_stream(64 * MiB, seed=5):
                sent.update(piece)
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=push)
        sender.start()
        while chunk := sock.recv(1 << 20):
            got.update(chunk)
            received += len(chunk)
        sender.join(timeout=30)
    assert received == 64 * MiB and got.hexdigest() == sent.hexdigest()
    end = _session_end(server, "echo")
    assert (end["bytes_in"], end["bytes_out"], end["reason"]) == (str(64 * MiB), str(64 * MiB), "eof"), end
    if header:
        assert end["peer"] == "192.0.2.7:4321"


@pytest.mark.timeout(60)
def test_idle_timeout_ends_an_idle_socket_session_and_spares_a_busy_one(gsrv) -> None:
    server = gsrv(service_toml("idle", ["cat"], relay="socket", idle_timeout="3s"))
    with server.connect("idle") as busy:
        for i in range(15):  # 3 s of traffic, a byte every 0.2 s: never idle for 3 s
            busy.sendall(b"%d" % (i % 10))
            assert busy.recv(10) == b"%d" % (i % 10)
            time.sleep(0.2)
        busy.shutdown(socket.SHUT_WR)
        assert busy.recv(10) == b""
    assert _session_end(server, "idle")["reason"] == "eof"
    with server.connect("idle") as idle:
        idle.sendall(b"ping")
        assert idle.recv(10) == b"ping"
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            idle.recv(10)
        assert time.monotonic() - started > 2.8  # not before idle_timeout
    server.wait_log(r"event=session_end service=idle .*reason=idle_timeout")


@pytest.mark.timeout(60)
def test_a_client_reset_mid_upload_reaches_the_childs_own_read(gsrv, tmp_path: Path) -> None:
    marker, outcome = tmp_path / "reading", tmp_path / "outcome"
    child = py_child(f"""
        import os, signal, subprocess
        subprocess.Popen(["sleep", "300"])  # the group: gone with the session
        total = 0
        try:
            while data := os.read(0, 65536):
                total += len(data)
                if total >= 1_000_000:
                    open({str(marker)!r}, "w").close()
            open({str(outcome)!r}, "w").write("eof")
        except OSError as e:
            open({str(outcome)!r}, "w").write(f"errno {{e.errno}}")
            raise SystemExit(3)
    """)
    server = gsrv(service_toml("upload", child, relay="socket"))
    sock = server.connect("upload")
    sock.sendall(b"u" * 1_000_000)
    wait_until(marker.exists, 10, "the child to read 1 MB")
    family = [p.pid for p in server.children()]
    assert len(family) == 2, family
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    wait_until(outcome.exists, 5, "the child's read to end")
    assert outcome.read_text() == f"errno {errno.ECONNRESET}"  # the watchdog read nothing of it

    def all_gone() -> bool:
        return not any(lives(pid) for pid in family)

    wait_until(all_gone, 5, f"the process group {family} to be gone")
    assert _session_end(server, "upload")["reason"] == "client_reset"


@pytest.mark.timeout(60)
def test_a_unix_socket_child_sees_its_client_with_so_peercred(gsrv, tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    child = py_child("""
        import socket, struct
        conn = socket.socket(fileno=0)
        print(*struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)), flush=True)
    """)
    text = service_toml("creds", child, relay="socket").replace('listen = "127.0.0.1:0"', f'listen = "unix:{path}"')
    server = gsrv(text)
    server.wait_log(r"event=listening service=creds")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(100):
            reply += chunk
    assert reply.split() == [str(os.getpid()).encode(), str(os.getuid()).encode(), str(os.getgid()).encode()]
    end = _session_end(server, "creds")
    assert (end["relay"], end["reason"]) == ("socket", "eof")
    assert "bytes_in" not in end and "bytes_out" not in end  # a unix socket's kernel does not count them


@pytest.mark.timeout(60)
def test_a_process_that_escaped_the_group_is_logged_as_holding_the_socket(gsrv) -> None:
    """kill_scope = "group": a setsid process leaves the group and keeps the socket (logged)."""
    child = ["sh", "-c", "setsid sleep 313.25 & echo started"]  # the escaped sleep keeps fds 0 and 1
    server = gsrv(service_toml("escape", child, relay="socket", kill_scope="group"))
    escaped: list[psutil.Process] = []
    try:
        with server.connect("escape") as sock:
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b"started\n"
            assert sock.recv(100) == b""  # gsrv's FIN, although the escaped process holds the socket
        end = _session_end(server, "escape")
        assert (end["reason"], end.get("socket_held")) == ("eof", "1"), end
    finally:
        escaped = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "313.25"]]
        for p in escaped:
            p.send_signal(signal.SIGKILL)
    assert len(escaped) == 1


@pytest.mark.skipif(discover().mode == "none", reason="no cgroups here")
def test_with_a_cgroup_per_session_nothing_escapes_holding_the_socket(gsrv) -> None:
    """kill_scope = "cgroup": the same setsid process ends with its session; nothing holds the socket."""
    child = ["sh", "-c", "setsid sleep 313.27 & echo started"]
    server = gsrv(service_toml("contained", child, relay="socket", kill_scope="cgroup"))
    with server.connect("contained") as sock:
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b"started\n"
        assert sock.recv(100) == b""
    end = _session_end(server, "contained")
    assert "socket_held" not in end, end
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "313.27"]]


@pytest.mark.timeout(60)
def test_tls_with_socket_handoff_is_a_config_error(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    config = tmp_path / "tls.toml"
    tls = {"cert": str(tmp_path / "server.pem"), "key": str(tmp_path / "server.key")}
    config.write_text(service_toml("up", ["cat"], relay="socket", tls=tls))
    result = subprocess.run([PY, "-m", "gsrv", "check", "-c", str(config)], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f'Error: {config}: [services.up] relay is "socket", which cannot go with tls: gsrv must see the bytes to '
        'decrypt them (use relay = "auto" with tls)\n'
    )


@pytest.mark.timeout(60)
def test_input_the_child_left_unread_does_not_reset_its_reply(gsrv) -> None:
    # The client's FIN has arrived, but 50 KB it sent were never read by the child: closing
    # over them would make the kernel reset the connection and drop the reply still queued.
    child = ["sh", "-c", "sleep 0.5; head -c 4194304 /dev/zero"]
    server = gsrv(service_toml("deaf", child, relay="socket"))
    with server.connect("deaf") as sock:
        sock.sendall(b"q" * 50_000)
        sock.shutdown(socket.SHUT_WR)
        time.sleep(1.5)  # the child writes into full buffers, exits with most of its reply queued
        received = 0
        while chunk := sock.recv(1 << 16):  # a reset raises here
            received += len(chunk)
    assert received == 4194304
    end = _session_end(server, "deaf")
    assert (end["reason"], end["bytes_in"], end["bytes_out"]) == ("eof", "50000", "4194304"), end
