"""A child's stderr as log lines (relay/stderr.py StderrLines): split, cut, and its rate budget."""

from __future__ import annotations

import pytest

from gsrv.relay.stderr import StderrLines

pytestmark = pytest.mark.timeout(60)


def test_stderr_lines_split_cap_and_rate() -> None:
    lines = StderrLines(cap=10, rate=3)
    assert lines.feed(b"one\ntw", now=0.0) == ["one"]
    assert lines.feed(b"o\n" + b"x" * 25 + b"\nthree\n", now=0.0) == ["two", "x" * 10 + " [cut]"]
    assert lines.dropped == 1  # "three": the budget of 3 per second is spent
    assert lines.feed(b"four\nfive", now=1.0) == ["four"]
    assert lines.finish(now=1.0) == ["five"]
