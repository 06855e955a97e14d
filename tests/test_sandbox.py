"""The sandbox (bubblewrap) per service: each key checked from inside the child, as systemd's
test-execute units check theirs. Under CI=true a missing bwrap fails these tests (.ci/run
installs it); elsewhere they skip."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import PY, ROOT, exchange, py_child, service_toml

from gsrv.contain.host import discover

BWRAP = shutil.which("bwrap")
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(BWRAP is None and os.environ.get("CI") != "true", reason="bwrap is not installed"),
]


def _talk(server, name: str, data: bytes = b"") -> str:
    with server.connect(name) as sock:
        return exchange(sock, data).decode()


def test_private_tmp_hides_the_hosts_tmp(gsrv, tmp_path):
    marker = Path("/tmp") / f"gsrv-sandbox-{os.getpid()}"
    marker.write_text("host")
    try:
        # sh, not this venv's python: a checkout under /tmp (CI's) is hidden by the private /tmp too
        look = f"if [ -e {marker} ]; then echo visible; else echo hidden; fi"
        probe = ["sh", "-c", f"{look}; echo x > /tmp/inside; ls /tmp"]
        server = gsrv(service_toml("tmp", probe, sandbox={"private_tmp": True}))
        assert _talk(server, "tmp") == "hidden\ninside\n"
        assert not Path("/tmp/inside").exists()
    finally:
        marker.unlink()


def test_private_network_has_its_own_loopback(gsrv):
    host = socket.create_server(("127.0.0.1", 0))
    port = host.getsockname()[1]
    try:
        probe = py_child(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=5)
                print("reached the host")
            except OSError as e:
                print("host refused:", e.errno)
            own = socket.create_server(("127.0.0.1", 0))
            c = socket.create_connection(own.getsockname(), timeout=5)
            a, _ = own.accept()
            c.sendall(b"ping")
            print("own loopback:", a.recv(4).decode())
        """)
        server = gsrv(service_toml("net", probe, sandbox={"private_network": True}))
        assert _talk(server, "net") == "host refused: 111\nown loopback: ping\n"
    finally:
        host.close()


def test_read_only_root_with_one_writable_dir(gsrv, tmp_path):
    writable = tmp_path / "out"
    writable.mkdir()
    probe = py_child(f"""
        import errno
        open("/dev/null", "w").write("devices still work")
        for path in ("{writable}/ok", "{tmp_path}/no", "/var/tmp/gsrv-sandbox-no"):
            try:
                open(path, "w").write("x")
                print(path, "written")
            except OSError as e:
                print(path, errno.errorcode[e.errno])
    """)
    server = gsrv(service_toml("ro", probe, sandbox={"read_only_paths": ["/"], "writable_paths": [str(writable)]}))
    lines = _talk(server, "ro").splitlines()
    assert lines == [f"{writable}/ok written", f"{tmp_path}/no EROFS", "/var/tmp/gsrv-sandbox-no EROFS"]
    assert (writable / "ok").read_text() == "x" and not (tmp_path / "no").exists()


@pytest.mark.parametrize("kill_scope", ["cgroup", "group"])
def test_a_sandboxed_child_killed_by_a_signal_logs_it(gsrv, kill_scope):
    """bwrap reports a command killed by signal N as exit 128+N: the log still says signal=KILL."""
    if kill_scope == "cgroup" and not discover().can("kill"):
        pytest.skip("no cgroups here")
    server = gsrv(service_toml("die", ["sh", "-c", "echo dying; kill -9 $$"], sandbox={"private_tmp": True},
                               kill_scope=kill_scope))  # fmt: skip
    with server.connect("die") as sock:
        assert sock.recv(100) == b"dying\n"
    line = server.wait_log("event=session_end service=die")
    assert "signal=KILL" in line and "exit=" not in line, line


def test_a_sandboxed_child_runs_as_the_configured_user(gsrv):
    if os.geteuid() != 0:
        pytest.skip("needs root (user = ...)")
    probe = ["sh", "-c", "id -u; touch /tmp/x && echo tmp-ok"]
    server = gsrv(service_toml("who", probe, user="nobody", sandbox={"private_tmp": True}))
    assert _talk(server, "who") == "65534\ntmp-ok\n"


def test_sandbox_config_errors(tmp_path):
    def check(service: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "c.toml"
        path.write_text(service)
        return subprocess.run([PY, "-m", "gsrv", "check", "-c", str(path)], capture_output=True, text=True,
                              cwd=ROOT, timeout=30, env=env)  # fmt: skip

    result = check(service_toml("s", ["/bin/cat"], sandbox={"private_tmpp": True}))
    assert result.returncode == 2 and '[services.s.sandbox] has unknown key "private_tmpp"' in result.stderr
    result = check(service_toml("s", ["/bin/cat"], sandbox={"writable_paths": ["relative/dir"]}))
    assert result.returncode == 2 and "writable_paths must list existing absolute paths" in result.stderr
    no_bwrap = {**os.environ, "PATH": str(tmp_path)}
    result = check(service_toml("s", ["/bin/cat"], sandbox={"private_tmp": True}), env=no_bwrap)
    assert result.returncode == 2, result
    assert re.search(r"\[services.s\] sandbox needs bubblewrap's bwrap, which is not on PATH", result.stderr)


def test_a_sandboxed_exit_above_128_that_is_no_signal_still_ends_whole(gsrv):
    """bwrap's 128+N is read as a signal only where N is one; exit 170 (N = 42, a real-time
    signal without a name of its own) and exit 160 (N = 32, not a signal here) still give one
    session_end line each."""
    server = gsrv(service_toml("rt", ["sh", "-c", "exit 170"], sandbox={"private_tmp": True})
                  + service_toml("nosig", ["sh", "-c", "exit 160"], sandbox={"private_tmp": True}))  # fmt: skip
    for name in ("rt", "nosig"):
        with server.connect(name) as sock, contextlib.suppress(ConnectionResetError):
            sock.recv(10)
    assert "signal=42" in server.wait_log("event=session_end service=rt ")
    assert "exit=160" in server.wait_log("event=session_end service=nosig ")
