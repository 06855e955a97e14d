"""The child's user, group, umask and rlimits, applied before the command runs."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Gsrv, service_toml


def reply(server: Gsrv, name: str) -> str:
    with server.connect(name) as sock:
        sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(65536), b"")).decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
def test_a_service_with_user_nobody_runs_its_child_as_nobody(gsrv: Callable[..., Gsrv]) -> None:
    show = "id -u; id -g; grep -E '^(Uid|Gid):' /proc/self/status"
    server = gsrv(
        service_toml("nobody", ["sh", "-c", show], user="nobody", cwd="/") + service_toml("root", ["id", "-u"], cwd="/")
    )
    lines = reply(server, "nobody").splitlines()
    nobody = 65534
    assert lines[0] == str(nobody)  # id -u
    assert lines[1] == str(nobody)  # id -g: nobody's own group
    assert lines[2].split()[1:] == [str(nobody)] * 4  # real, effective, saved, filesystem: no way back
    assert lines[3].split()[1:] == [str(nobody)] * 4
    assert reply(server, "root").strip() == "0"
    line = server.wait_log(r"event=session_end service=nobody")
    assert "exit=0" in line and "reason=eof" in line, line


def test_rlimits_fsize_stops_a_child_writing_past_it(gsrv: Callable[..., Gsrv], tmp_path: Path) -> None:
    target = tmp_path / "out"
    write = 'head -c 3000000 /dev/zero > "$1"; echo "rc=$?"; wc -c < "$1"'
    server = gsrv(service_toml("fsize", ["sh", "-c", write, "sh", str(target)], rlimits={"fsize": "1MiB"}))
    rc, size = reply(server, "fsize").split()
    assert rc == "rc=153"  # head was killed by SIGXFSZ (128 + 25)
    assert int(size) == 1024 * 1024 == target.stat().st_size


def test_every_rlimit_and_the_umask_reach_the_child(gsrv: Callable[..., Gsrv]) -> None:
    limits = {"nofile": 64, "as": "1GiB", "cpu": "30s", "fsize": "10MiB", "nproc": 4000}
    server = gsrv(
        service_toml("limits", ["cat", "/proc/self/limits"], rlimits=limits)
        + service_toml("mask", ["sh", "-c", "umask"], umask="0027")
    )
    table = {}
    for line in reply(server, "limits").splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        table[name] = (soft, hard)
    assert table["Max open files"] == ("64", "64")
    assert table["Max address space"] == (str(1024**3),) * 2
    assert table["Max cpu time"] == ("30", "30")
    assert table["Max file size"] == (str(10 * 1024**2),) * 2
    assert table["Max processes"] == ("4000", "4000")
    assert reply(server, "mask").strip() == "0027"
