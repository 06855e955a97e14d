"""A log line in its two formats (logs.py)."""

from __future__ import annotations

import json
import os
import time

import gevent
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gsrv.logs import PIPE_BUF, STDERR_TEXT_MAX, ErrorStream, Log, format_line, log_lines_from, timestamp

pytestmark = pytest.mark.timeout(60)


def test_log_line_formats() -> None:
    fields = {"service": "up", "line": 'say "hi" = x', "exit": 0, "signal": None}
    text = format_line("text", "info", "child_stderr", fields, 0.5)
    assert text == 'ts=1970-01-01T00:00:00.500Z level=info event=child_stderr service=up line="say \\"hi\\" = x" exit=0'
    record = json.loads(format_line("json", "info", "child_stderr", fields, 0.5))
    assert record == {"ts": "1970-01-01T00:00:00.500Z", "level": "info", "event": "child_stderr", "service": "up",
                      "line": 'say "hi" = x', "exit": 0}  # fmt: skip


@given(st.lists(st.floats(0, 4e9), min_size=1, max_size=8))
def test_a_timestamp_is_the_calendars_whatever_came_before(moments: list[float]) -> None:
    """The second's text is kept from the line before: any order of moments gives each its own."""
    for now in moments:
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(now))) + f".{int(now * 1000) % 1000:03d}Z"
        assert timestamp(now) == expected


def test_lines_queued_together_go_out_whole_and_in_order() -> None:
    """500 lines logged without a yield: one write carries several (never more than PIPE_BUF),
    and the pipe gets every line once, in order."""
    read_fd, write_fd = os.pipe()
    log = Log(write_fd)
    for n in range(500):
        log.info("count", n=n, pad="x" * (n % 50))
    writes = 0
    while log._queue:
        assert all(len(line) <= PIPE_BUF for line in log._queue)
        log._write_some()
        writes += 1
    got = b""
    while len(got.splitlines()) < 500:
        got += os.read(read_fd, 1 << 16)
    assert [line.split()[3] for line in got.decode().splitlines()] == [f"n={n}" for n in range(500)]
    assert writes < 100, writes
    os.close(read_fd)
    os.close(write_fd)


def _logged(read_fd: int) -> list[str]:
    os.set_blocking(read_fd, False)
    try:
        return os.read(read_fd, 1 << 20).decode().splitlines()
    except BlockingIOError:
        return []


def test_what_python_and_gevent_would_write_to_fd_2_becomes_one_log_line_a_report() -> None:
    read_fd, write_fd = os.pipe()
    log = Log(write_fd)
    errors = ErrorStream(log)
    hub = gevent.get_hub()
    hub.exception_stream = errors
    try:
        gevent.spawn(lambda: 1 / 0).join()  # gevent's hub reports a greenlet that raised
        gevent.sleep(0)
        errors.write("x" * (3 * STDERR_TEXT_MAX) + "the end\n")
        gevent.sleep(0)
        log.flush()
    finally:
        del hub.exception_stream  # back to gevent's own (sys.stderr)
        os.close(write_fd)
    lines = _logged(read_fd)
    os.close(read_fd)
    assert len(lines) == 2, lines
    assert "event=stderr process=gsrv" in lines[0] and "ZeroDivisionError" in lines[0], lines[0]
    assert lines[1].endswith('the end"') and len(lines[1]) < STDERR_TEXT_MAX + 200


def test_a_helper_processs_stderr_pipe_becomes_log_lines() -> None:
    read_fd, write_fd = os.pipe()
    log = Log(write_fd)
    helper_read, helper_write = os.pipe()
    reader = log_lines_from(helper_read, log, "spawner")
    os.write(helper_write, b"Traceback (most recent call last):\n" + b"y" * (2 * STDERR_TEXT_MAX) + b"\nlast")
    os.close(helper_write)
    reader.join(timeout=10)
    log.flush()
    os.close(write_fd)
    lines = _logged(read_fd)
    os.close(read_fd)
    assert [line.split(" text=")[0].split(" ", 2)[2] for line in lines] == ["event=stderr process=spawner"] * 3
    assert lines[0].endswith('"Traceback (most recent call last):"') and lines[2].endswith("text=last")
    assert len(lines[1]) < STDERR_TEXT_MAX + 200
    with pytest.raises(OSError):
        os.fstat(helper_read)  # closed at the pipe's end
