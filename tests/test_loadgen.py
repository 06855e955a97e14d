"""`gsrv load` against a real gsrv: verified uploads and echoes, and a corrupting service."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import PY, ROOT, py_child, service_toml, wait_until

FLIP = """
    import sys
    data = sys.stdin.buffer.read()
    sys.stdout.buffer.write(data[:100] + bytes([data[100] ^ 1]) + data[101:])
"""


def _load(server, name: str, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    host, port = server.address(name)
    argv = [PY, "-m", "gsrv", "load", f"{host}:{port}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=ROOT)


@pytest.mark.timeout(300)
def test_load_verify_uploads_and_echoes(gsrv) -> None:
    server = gsrv(service_toml("sha", ["sha256sum"]) + service_toml("echo", ["cat"]))
    up = _load(server, "sha", "--sessions", "500", "--concurrency", "20", "--bytes", "1MiB", "--verify", "--json",
               "--server-pid", str(server.proc.pid))  # fmt: skip
    assert up.returncode == 0, up.stderr
    report = json.loads(up.stdout)
    assert (report["sessions"], report["failed"], report["bytes_sent"]) == (500, 0, 500 * 2**20)
    assert report["server_peak_rss"] > 0 and report["latency_ms"]["p99"] is not None
    echo = _load(server, "echo", "--mode", "echo", "--sessions", "200", "--concurrency", "20", "--bytes", "1MiB",
                 "--verify", "--json")  # fmt: skip
    assert echo.returncode == 0, echo.stderr
    report = json.loads(echo.stdout)
    assert (report["sessions"], report["failed"], report["bytes_received"]) == (200, 0, 200 * 2**20)


@pytest.mark.timeout(120)
def test_load_verify_catches_a_corrupting_service(gsrv) -> None:
    server = gsrv(service_toml("flip", py_child(FLIP)))
    result = _load(server, "flip", "--mode", "echo", "--sessions", "5", "--bytes", "64KiB", "--verify")
    assert result.returncode == 1
    assert "FAILED: 5 sessions" in result.stderr
    assert "verify: 5 (for example session " in result.stderr
    assert "the echo (65536 bytes) differs from what was sent (65536 bytes)" in result.stderr


@pytest.mark.timeout(60)
def test_load_reports_refused_connections_and_bad_arguments() -> None:
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = holder.getsockname()[1]
    try:
        result = subprocess.run([PY, "-m", "gsrv", "load", f"127.0.0.1:{port}", "--sessions", "3"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    finally:
        holder.close()
    assert result.returncode == 1 and "refused: 3" in result.stderr
    bad = subprocess.run([PY, "-m", "gsrv", "load", "127.0.0.1:1", "--bytes", "lots"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2 and 'expected a size like 1MiB or 4096 (got "lots")' in bad.stderr


@pytest.mark.timeout(120)
def test_load_download_slow_reader_and_stall_with_rate_and_duration(gsrv) -> None:
    server = gsrv(
        service_toml("source", ["head", "-c", "1048576", "/dev/zero"]) + service_toml("sink", ["sleep", "60"])
    )
    down = _load(server, "source", "--mode", "download", "--sessions", "4", "--concurrency", "2",
                 "--read-rate", "4MiB", "--json")  # fmt: skip
    report = json.loads(down.stdout)
    assert (down.returncode, report["failed"], report["bytes_received"]) == (0, 0, 4 * 2**20)
    assert report["seconds"] >= 0.4  # 4 MiB at 4 MiB/s over 2 connections cannot be instant
    stall = _load(server, "sink", "--mode", "stall", "--sessions", "50", "--concurrency", "10", "--rate", "20",
                  "--duration", "3s", "--json")  # fmt: skip
    report = json.loads(stall.stdout)
    assert stall.returncode == 0 and report["failed"] == 0
    assert 10 <= report["sessions"] < 50 and report["bytes_sent"] > 0  # --duration stopped new sessions


@pytest.mark.timeout(120)
def test_load_stops_starting_sessions_on_sigint_and_reports_the_ones_that_ran(gsrv) -> None:
    server = gsrv(service_toml("slow", ["sh", "-c", "sleep 0.2; exec sha256sum"]))
    host, port = server.address("slow")
    argv = [PY, "-m", "gsrv", "load", f"{host}:{port}", "--sessions", "100000", "--concurrency", "4", "--verify",
            "--json"]  # fmt: skip
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        server.wait_log(r"event=session_end .*reason=eof", timeout=30)
        load.send_signal(signal.SIGINT)
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait(timeout=10)
    assert load.returncode == 0, err
    report = json.loads(out)
    assert report["stopped_by_signal"] and report["failed"] == 0
    assert 0 < report["sessions"] < 100000
    ended = r"event=session_end .*exit=0 .*reason=eof"
    wait_until(lambda: server.count_log(ended) >= report["sessions"], 10, "each session's end in the log")
    time.sleep(0.5)  # a session the report missed would end by now
    assert server.count_log(ended) == report["sessions"], "each session that ran is in the report"


@pytest.mark.timeout(120)
def test_load_ends_stalls_on_sigint_and_running_sessions_on_a_second(gsrv) -> None:
    server = gsrv(service_toml("held", ["cat"]) + service_toml("mute", ["sleep", "600"]))

    def run(name: str, child: str, signals: int, *args: str) -> dict:  # type: ignore[type-arg]
        host, port = server.address(name)
        argv = [PY, "-m", "gsrv", "load", f"{host}:{port}", "--concurrency", "3", "--json", *args]
        load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            running = lambda: sum(p.name() == child for p in server.children()) >= 3  # noqa: E731
            wait_until(running, 30, f"3 sessions running {child}")
            for _ in range(signals):
                load.send_signal(signal.SIGINT)
                time.sleep(0.5)
            out, err = load.communicate(timeout=20)  # a 10-minute stall or a mute child: only the signals end them
        finally:
            if load.poll() is None:
                load.kill()
                load.wait(timeout=10)
        return json.loads(out)  # type: ignore[no-any-return]

    stalls = run("held", "cat", 1, "--mode", "stall", "--sessions", "3", "--duration", "10m")
    assert stalls["stopped_by_signal"] and (stalls["sessions"], stalls["failed"]) == (3, 0), stalls
    mute = run("mute", "sleep", 2, "--sessions", "100")
    assert mute["aborted_by_signal"] == 3 and mute["sessions"] == 0, mute
