"""Children started ahead (`prespawn`) and the client's address on their stdin (`peer_line`)."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time

import psutil
import pytest
from conftest import PY, ROOT, exchange, lives, service_toml, wait_until

# A command slow to start (it imports before it reads), which says who it is and what it read.
SLOW = [
    PY,
    "-c",
    "import json, decimal, os, sys; line = sys.stdin.buffer.readline();"
    " rest = sys.stdin.buffer.read(); print(os.getpid(), line.decode().strip(), len(rest),"
    " os.environ.get('TCPREMOTEIP'), os.environ.get('GSRV_PRESPAWN'), flush=True)",
]


def _waiting(server, marker: str = "decimal") -> set[int]:  # type: ignore[no-untyped-def]
    """The children of the command running now: between sessions, those started ahead."""
    found = set()
    for p in server.children():
        with contextlib.suppress(psutil.Error):
            if marker in " ".join(p.cmdline()):
                found.add(p.pid)
    return found


def _ask(server, data: bytes) -> tuple[list[str], float, int]:  # type: ignore[no-untyped-def]
    """The reply's fields, when the client connected, and the client's port."""
    connected = time.time()
    with server.connect("py") as sock:
        port = sock.getsockname()[1]
        reply = exchange(sock, data)
    return reply.decode().split(), connected, port


def test_a_session_gets_a_child_started_before_its_client(gsrv):
    server = gsrv(service_toml("py", SLOW, prespawn=4))
    wait_until(lambda: len(_waiting(server)) == 4, 20, "4 children started ahead")
    ahead = set(_waiting(server))  # running before the client connects
    fields, _, _ = _ask(server, b"first line\nand the rest")
    pid = int(fields[0])
    assert pid in ahead, (pid, ahead)  # the child started before its client connected
    assert fields[1:] == ["first", "line", "12", "None", "1"], fields  # no client address in its environment
    line = server.wait_log(r"event=session_end service=py ")
    assert "bytes_in=23 " in line and "reason=eof" in line, line
    wait_until(lambda: len(_waiting(server)) == 4, 20, "another child started behind it")


def test_peer_line_gives_the_child_its_clients_address(gsrv):
    server = gsrv(service_toml("py", SLOW, prespawn=2, peer_line="proxy-v1"))
    fields, _, port = _ask(server, b"0123456789")
    local = server.address("py")[1]
    assert fields[1:7] == ["PROXY", "TCP4", "127.0.0.1", "127.0.0.1", str(port), str(local)], fields
    assert fields[7] == "10", fields  # the client's bytes follow the line, exactly
    line = server.wait_log(r"event=session_end service=py ")
    assert "bytes_in=10 " in line, line  # the line is not the client's


def test_a_reload_with_a_new_command_retires_the_waiting_children(gsrv):
    server = gsrv(service_toml("py", SLOW, prespawn=3))
    wait_until(lambda: len(_waiting(server)) == 3, 20, "3 children started ahead")
    old = _waiting(server)
    server.config.write_text(server.config.read_text().replace("decimal,", "decimal, fractions,"))
    server.signal(signal.SIGHUP)
    server.wait_log(r"event=prespawn_retired service=py children=3 why=reload")
    wait_until(lambda: not any(lives(pid) for pid in old), 10, "the old waiting children to end")
    wait_until(lambda: len(_waiting(server, "fractions")) == 3, 20, "3 children of the new command")
    new = _waiting(server, "fractions")
    fields, _, _ = _ask(server, b"x\n")
    assert int(fields[0]) in new, (fields, new)


def test_a_waiting_child_killed_from_outside_is_replaced(gsrv):
    server = gsrv(service_toml("py", SLOW, prespawn=2))
    wait_until(lambda: len(_waiting(server)) == 2, 20, "2 children started ahead")
    victim = min(_waiting(server))
    subprocess.run(["kill", "-KILL", str(victim)], check=True, timeout=10)
    line = server.wait_log(r"event=prespawn_died service=py ")
    assert f"pid={victim} " in line and "signal=KILL" in line, line
    wait_until(lambda: len(_waiting(server)) == 2 and victim not in _waiting(server), 20, "a replacement")
    fields, _, _ = _ask(server, b"x\n")
    assert int(fields[0]) != victim


def test_a_drain_leaves_no_waiting_child(gsrv):
    server = gsrv(service_toml("py", SLOW, prespawn=4))
    wait_until(lambda: len(_waiting(server)) == 4, 20, "4 children started ahead")
    ahead = _waiting(server)
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    assert "prespawn_retired" in "\n".join(server.lines)
    wait_until(lambda: not any(lives(pid) for pid in ahead), 10, "every waiting child to end")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"prespawn": 2, "relay": "socket"}, 'prespawn cannot go with relay = "socket"'),
        ({"peer_line": "proxy-v1", "pty": True}, "peer_line cannot go with pty = true"),
        ({"prespawn": 2, "pty": True}, "prespawn cannot go with pty = true"),
        ({"peer_line": "proxy-v1", "relay": "socket"}, 'peer_line cannot go with relay = "socket"'),
    ],
)
def test_config_errors(tmp_path, keys, message):
    path = tmp_path / "c.toml"
    path.write_text(service_toml("s", ["cat"], **keys))
    result = subprocess.run([PY, "-m", "gsrv", "check", "-c", str(path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=30)  # fmt: skip
    assert result.returncode == 2, result
    assert f"[services.s] {message}" in result.stderr, result.stderr


def test_the_shipped_json_demo_answers_as_the_readme_says(gsrv, tmp_path):
    text = (ROOT / "conf" / "gsrv.toml").read_text()
    text = re.sub(r'listen = "127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:0"', text)
    server = gsrv(text.replace("unix:/tmp/gsrv-python.sock", f"unix:{tmp_path / 'python.sock'}"))
    wait_until(lambda: len(_waiting(server, "json.tool")) == 2, 20, "2 json.tool children started ahead")
    with server.connect("json") as sock:
        assert exchange(sock, b'{"a": [1, 2]}\n') == b'{\n    "a": [\n        1,\n        2\n    ]\n}\n'


def test_check_says_what_a_child_started_ahead_lacks(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(service_toml("s", ["cat"], prespawn=2))
    result = subprocess.run([PY, "-m", "gsrv", "check", "-c", str(path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "prespawn=2" in result.stdout and "no client address in its environment" in result.stdout
