"""record = DIR with real gsrv: each session an asciicast v2 file that parses line by line and
that asciinema itself plays back; record_max cuts and logs; an unwritable directory is logged
once and the session runs on."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import exchange, py_child, service_toml, service_with, wait_until

ASCIINEMA = shutil.which("asciinema")


def cast_of(server, name: str) -> Path:  # type: ignore[no-untyped-def]
    line = server.wait_log(rf"event=session_end service={name} ")
    found = re.search(r"record=(\S+)", line)
    assert found, line
    return Path(found.group(1))


def events(path: Path) -> tuple[dict[str, object], list[list[object]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


@pytest.mark.timeout(60)
def test_a_pty_session_over_websocket_is_a_valid_cast_that_asciinema_plays(gsrv, tmp_path: Path) -> None:
    from test_websocket import raw_client

    casts = tmp_path / "casts"
    casts.mkdir()
    child = py_child("import sys; print('héllo from the child', flush=True); sys.stdin.readline(); print('bye')")
    server = gsrv(service_with("term", child, "websocket", None, transport="websocket", pty=True,
                               record=str(casts), record_input=True))  # fmt: skip
    with raw_client(server, "term") as (sock, proto):
        sock.sendall(proto.send_data(b"r100x30") + proto.send_data(b"ityped line\r"))
        got = b""
        while b"bye" not in got:
            data = sock.recv(65536)
            assert data, got
            proto.receive_bytes(data)
            got += b"".join(bytes(f.payload) for f in proto.received_frames() if isinstance(f.payload, bytes))
    path = cast_of(server, "term")
    assert path.parent == casts and stat.S_IMODE(path.stat().st_mode) == 0o600
    wait_until(lambda: "bye" in path.read_text(encoding="utf-8"), 10, "the last output in the file")
    header, rest = events(path)
    assert header["version"] == 2 and header["width"] == 80 and header["height"] == 24
    kinds = {event[1] for event in rest}
    assert kinds == {"o", "i", "r"} and ["r", "100x30"] in [event[1:] for event in rest]
    times = [event[0] for event in rest]
    assert times == sorted(times)
    output = "".join(str(event[2]) for event in rest if event[1] == "o")
    assert "héllo from the child" in output and "bye" in output
    if ASCIINEMA or os.environ.get("CI"):  # asciinema wants a terminal: script gives it one
        played = subprocess.run(["script", "-qec", f"asciinema cat {path}", "/dev/null"], capture_output=True,
                                timeout=30)  # fmt: skip
        assert "héllo from the child" in played.stdout.decode(errors="replace"), played


@pytest.mark.timeout(60)
def test_record_max_cuts_at_an_event_and_an_unwritable_directory_is_logged_once(gsrv, tmp_path: Path) -> None:
    casts, gone = tmp_path / "casts", tmp_path / "gone"
    casts.mkdir()
    gone.mkdir()
    server = gsrv(service_toml("big", ["head", "-c", "300000", "/dev/zero"], record=str(casts), record_max="64KiB")
                  + service_toml("lost", ["cat"], record=str(gone)))  # fmt: skip
    with server.connect("big") as sock:
        assert len(exchange(sock, b"")) == 300000  # the session itself is whole
    path = cast_of(server, "big")
    assert "record_cut=record_max" in server.wait_log(r"event=session_end service=big ")
    assert "why=record_max" in server.wait_log(r"event=record_cut service=big ")
    wait_until(lambda: path.exists() and path.stat().st_size > 0, 10, "the cast file")
    assert path.stat().st_size <= 64 * 1024
    events(path)  # every line whole
    gone.rmdir()  # the directory goes away under gsrv: nothing can be written there now
    with server.connect("lost") as sock:
        assert exchange(sock, b"still served\n") == b"still served\n"
    line = server.wait_log(r"event=session_end service=lost ")
    assert "reason=eof" in line and "record_cut=write_failed" in line, line
    assert server.count_log(r"event=record_cut service=lost ") == 1


def test_record_with_socket_or_splice_is_a_config_error(tmp_path: Path) -> None:
    from gsrv.config.parse import parse
    from gsrv.errors import ConfigError

    for relay in ("socket", "splice"):
        text = service_toml("x", ["cat"], relay=relay, record=str(tmp_path))
        with pytest.raises(ConfigError, match=f'record cannot go with relay = "{relay}"'):
            parse("t.toml", text)
