"""Operations: inherited and unix sockets, live reload of listeners, --set, no orphans."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import PY, ROOT, Gsrv, exchange, lives, service_toml, wait_until


@pytest.mark.timeout(60)
@pytest.mark.parametrize("relay", ["auto", "socket"])  # the guardian ends socket handoff's groups too
def test_sigkill_leaves_no_child_behind(gsrv, relay: str) -> None:
    server = gsrv(service_toml("hold", ["sh", "-c", "sleep 300 | sleep 300"], relay=relay))
    clients = [server.connect("hold") for _ in range(20)]
    family = wait_until(lambda: len(server.children()) >= 60 and server.children(), 20, "20 sessions with 3 processes")
    pids = [p.pid for p in family]
    assert len(pids) >= 60
    server.proc.kill()
    server.wait(timeout=10)

    def none_alive() -> bool:
        return not any(lives(pid) for pid in pids)

    wait_until(none_alive, 5, "every process of the 20 sessions to be gone")
    for c in clients:
        c.close()


@pytest.mark.timeout(60)
def test_unix_socket_service_sets_proto_unix(gsrv, tmp_path: Path) -> None:
    path = tmp_path / "env.sock"
    path.write_text("")  # not a socket: gsrv must refuse to replace it
    child = ["sh", "-c", 'echo "$PROTO $UNIXREMOTEPID $GSRV_SERVICE"']
    text = service_toml("env", child).replace('listen = "127.0.0.1:0"', f'listen = "unix:{path}"')
    refused = subprocess.run([PY, "-m", "gsrv", "serve", "-c", str(_write(tmp_path, text))], capture_output=True,
                             text=True, timeout=20, cwd=ROOT)  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr == f"Error: service env: cannot listen on unix:{path}: the path exists and is not a socket\n"
    path.unlink()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file whose process is gone: replaced
    stale.close()
    server = gsrv(text.replace("[services.env]", '[services.env]\nmode = "0600"'))
    server.wait_log(rf"event=listening service=env address=unix:{path}")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        assert exchange(sock, b"").decode().split() == ["UNIX", str(os.getpid()), "env"]
    server.stop()
    assert not path.exists()  # gsrv removes the socket file it made


def _write(tmp_path: Path, text: str, name: str = "ops.toml") -> Path:
    config = tmp_path / name
    config.write_text(text)
    return config


def _systemd_child(sock: socket.socket, config: Path) -> subprocess.Popen[bytes]:
    """Start gsrv the way systemd does: the socket on fd 3, LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES."""
    code = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[2]), 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='echo')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'gsrv', 'serve', '-c', sys.argv[1]])\n"
    )
    argv = [PY, "-c", code, str(config), str(sock.fileno())]
    return subprocess.Popen(argv, cwd=ROOT, pass_fds=(sock.fileno(),), stderr=subprocess.PIPE)


@pytest.mark.timeout(60)
def test_systemd_socket_activation(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    address = listener.getsockname()
    config = _write(tmp_path, service_toml("echo", ["cat"]).replace('"127.0.0.1:0"', '"systemd:echo"'))
    proc = _systemd_child(listener, config)
    try:
        with socket.create_connection(address, timeout=20) as sock:  # queued before gsrv even listens
            assert exchange(sock, b"activated") == b"activated"
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=20)
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        proc.stderr.close()
    assert status == 0, log
    assert f"address=127.0.0.1:{address[1]} via=systemd:echo" in log, log
    # the inherited socket is not closed by gsrv's drain: it still accepts for its owner
    with socket.create_connection(address, timeout=5):
        pass
    listener.close()


@pytest.mark.timeout(60)
def test_reload_adds_removes_and_rebinds_without_dropping_a_transfer(gsrv) -> None:
    text = service_toml("keep", ["cat"]) + service_toml("gone", ["cat"]) + service_toml("moved", ["cat"])
    server = gsrv(text)
    keep, gone, moved = server.address("keep"), server.address("gone"), server.address("moved")
    in_flight = server.connect("gone")
    in_flight.sendall(b"part one ")
    assert in_flight.recv(100) == b"part one "
    new = service_toml("keep", ["tr", "a-z", "A-Z"]) + service_toml("added", ["cat"])
    new += service_toml("moved", ["cat"]).replace('"127.0.0.1:0"', '"127.0.0.2:0"')
    server.config.write_text(new)
    server.signal(signal.SIGHUP)
    line = server.wait_log(r"event=reloaded")
    assert "added=added" in line and "removed=gone" in line and "rebound=moved" in line and "updated=keep" in line
    assert exchange(in_flight, b"part two") == b"part two"  # the removed service's session finished
    in_flight.close()
    with socket.create_connection(keep, timeout=10) as sock:  # same socket, new command
        assert exchange(sock, b"same port") == b"SAME PORT"
    with pytest.raises(OSError):
        socket.create_connection(gone, timeout=2).close()
    with pytest.raises(OSError):
        socket.create_connection(moved, timeout=2).close()
    added = server.wait_log(r"event=listening service=added")
    moved_to = server.wait_log(r"event=listening service=moved address=127\.0\.0\.2:")
    for line in (added, moved_to):
        host, port = line.split("address=")[1].split()[0].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            assert exchange(sock, b"new") == b"new"


@pytest.mark.timeout(60)
def test_set_overrides_a_key_like_the_file(tmp_path: Path) -> None:
    config = _write(tmp_path, service_toml("echo", ["cat"]))
    ok = subprocess.run([PY, "-m", "gsrv", "check", "-c", str(config), "--set", "services.echo.max_sessions=7"],
                        capture_output=True, text=True, timeout=20, cwd=ROOT)  # fmt: skip
    assert ok.returncode == 0 and "max_sessions=7 " in ok.stdout
    bad = subprocess.run([PY, "-m", "gsrv", "check", "-c", str(config), "--set", "services.echo.max_sessions=0"],
                         capture_output=True, text=True, timeout=20, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr == f"Error: {config}: [services.echo] max_sessions must be an integer >= 1 (got 0, an integer)\n"


@pytest.mark.timeout(60)
def test_guard_override_from_the_command_line(tmp_path: Path) -> None:
    config = _write(tmp_path, '[guard]\ninterval = "100ms"\n' + service_toml("echo", ["cat"]))
    server = Gsrv(config, extra_args=["--set", "guard.max_rss=1MiB", "--set", "guard.resume_rss=1MiB"])
    try:
        server.wait_log(r"event=accept_paused reason=rss .*max_rss=1MiB")
    finally:
        server.stop()
