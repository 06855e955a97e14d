"""A child's stderr as log lines (relay/stderr.py): split, cut, its rate budget, and its reader."""

from __future__ import annotations

import os

import gevent
import pytest
from gevent.event import Event

from gsrv.relay.stderr import StderrLines, StderrLog

pytestmark = pytest.mark.timeout(60)


def test_stderr_lines_split_cap_and_rate() -> None:
    lines = StderrLines(cap=10, rate=3)
    assert lines.feed(b"one\ntw", now=0.0) == ["one"]
    assert lines.feed(b"o\n" + b"x" * 25 + b"\nthree\n", now=0.0) == ["two", "x" * 10 + " [cut]"]
    assert lines.dropped == 1  # "three": the budget of 3 per second is spent
    assert lines.feed(b"four\nfive", now=1.0) == ["four"]
    assert lines.finish(now=1.0) == ["five"]


@pytest.mark.parametrize(
    ("written", "lines", "reader"),
    [
        (b"", [], False),  # most children: EOF at once, and no reader greenlet for it
        (b"one\ntwo", ["one", "two"], True),  # bytes: a reader takes the pipe over until its EOF
    ],
)
def test_a_childs_stderr_costs_a_reader_only_once_it_wrote(written: bytes, lines: list[str], reader: bool) -> None:
    """The watcher's first wake reads what is there: an EOF ends it without a greenlet; bytes
    are logged and a reader goes on (a child may write more)."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK)
    logged: list[str] = []
    stderr = StderrLog(logged.append)
    stderr.open(read_fd, Event())
    os.write(write_fd, written)
    os.close(write_fd)
    gevent.sleep(0.05)  # the watcher's wake
    assert (stderr.reader is not None) == reader
    if stderr.reader is not None:
        stderr.reader.join(5)
    stderr.end()
    stderr.tail()
    assert logged == lines
    os.close(read_fd)
