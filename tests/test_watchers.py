"""share = "read-only" | "read-write" with real gsrv and the tests' own gsrv-term client
(tests/termclient.py): a watcher sees the driver's session live, a read-only watcher's keys
reach nothing, a read-write one's reach the terminal, a watcher that stops reading is closed
(4413) while the driver's 64 MiB arrive exact."""

from __future__ import annotations

import hashlib
import time

import pytest
from conftest import py_child, service_with, wait_until
from termclient import answered
from wsproto.frame_protocol import Opcode

MiB = 1024 * 1024


def shared(name: str, command: list[str], share: str, **keys: object) -> str:
    return service_with(name, command, "websocket", {"share": share}, transport="websocket", pty=True, **keys)


@pytest.mark.timeout(60)
def test_a_read_only_watcher_sees_the_drivers_typing_and_its_own_keys_reach_nothing(gsrv, term, tmp_path) -> None:
    server = gsrv(shared("shell", ["bash", "--norc", "--noprofile", "-i"], "read-only", env={"PS1": "gsrv$ "}))
    driver = term(server, "shell", {})
    hello = answered(driver)
    assert hello["share"] == "read-only" and isinstance(hello["watch"], str) and "token" not in hello, hello
    driver.pump(lambda: b"gsrv$ " in driver.output)
    driver.send(b"iecho before-watcher\r")
    driver.pump(lambda: b"\rbefore-watcher\r\n" in driver.output)
    watcher = term(server, "shell", {"watch": hello["watch"]})
    assert answered(watcher)["share"] == "read-only"
    watcher.pump(lambda: b"before-watcher" in watcher.output)  # the kept output first
    marker = tmp_path / "watcher-typed"
    watcher.send(b"itouch " + str(marker).encode() + b"\r")  # reaches nothing
    driver.send(b"iecho driven-$((6*7))\r")
    watcher.pump(lambda: b"driven-42" in watcher.output)
    driver.pump(lambda: b"driven-42" in driver.output)
    time.sleep(0.5)  # what the watcher typed had time to reach the terminal, had it gone anywhere
    driver.send(b"iecho after\r")
    driver.pump(lambda: b"\rafter\r\n" in driver.output)
    assert not marker.exists() and b"touch" not in driver.output
    server.wait_log(r"event=watcher_joined service=shell .*share=read-only watchers=1")
    assert hello["watch"] not in "\n".join(server.lines)
    driver.send(b"iexit\r")
    driver.pump(lambda: False)
    watcher.pump(lambda: False)
    assert driver.closed == (1000, "exit=0") and watcher.closed == (1000, "exit=0"), (driver.closed, watcher.closed)
    line = server.wait_log(r"event=session_end service=shell")
    assert "watchers=1" in line, line


@pytest.mark.timeout(60)
def test_a_read_write_watcher_types_into_the_session_and_a_watch_token_cannot_reattach(gsrv, term) -> None:
    server = gsrv(shared("shell", ["cat"], "read-write"))
    driver = term(server, "shell", {})
    hello = answered(driver)
    watcher = term(server, "shell", {"watch": hello["watch"]})
    answered(watcher)
    watcher.send(b"ifrom-the-watcher\r")
    driver.pump(lambda: driver.output.count(b"from-the-watcher\r\n") == 2)  # the echo, then cat's
    thief = term(server, "shell", {"resume": hello["watch"], "offset": 0})
    thief.pump(lambda: False)
    assert thief.closed == (4404, "no_session"), thief.closed


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_watcher_that_stops_reading_is_closed_while_the_drivers_64_mib_arrive_exact(gsrv, term) -> None:
    block = bytes(range(32, 127)) * 1000  # no newline: the terminal passes it as it is
    total = 64 * MiB
    child = py_child(f"import sys\nsys.stdin.readline()\nblock = bytes(range(32, 127)) * 1000\nleft = {total}\n"
                     "while left:\n    n = min(left, len(block))\n    sys.stdout.buffer.write(block[:n])\n"
                     "    left -= n\nsys.stdout.flush()\n")  # fmt: skip
    server = gsrv(shared("flood", child, "read-only"))
    driver = term(server, "flood", {})
    hello = answered(driver)
    watcher = term(server, "flood", {"watch": hello["watch"]})
    answered(watcher)  # and then it reads no more (the kernel's buffers fill, then its queue in gsrv)
    driver.send(b"igo\r")
    driver.pump(lambda: server.count_log(r"event=watcher_left service=flood .*why=fell_behind") == 1, timeout=60)
    watcher.sock.settimeout(10)  # reading again at once: its queue was dropped, the close frame follows what the
    # kernel holds (gsrv gives it LINGER_S: a watcher that reads no more by then gets a reset)
    while watcher.closed is None:
        chunk = watcher.sock.recv(1 << 20)
        assert chunk, "a reset or an end without the close frame"
        watcher.proto.receive_bytes(chunk)
        for frame in watcher.proto.received_frames():
            if frame.opcode is Opcode.CLOSE:
                watcher.closed = (int(frame.payload[0]), str(frame.payload[1]))
    assert watcher.closed == (4413, "fell_behind")
    driver.pump(lambda: False, timeout=100)
    assert driver.closed == (1000, "exit=0"), driver.closed
    output = bytes(driver.output)
    assert output.startswith(b"go\r\n") and len(output) == 4 + total
    expected = hashlib.sha256()
    left = total
    while left:
        expected.update(block[: min(left, len(block))])
        left -= min(left, len(block))
    assert hashlib.sha256(output[4:]).hexdigest() == expected.hexdigest()
    wait_until(lambda: server.count_log(r"event=session_end service=flood") == 1, 10, "the session's end")
