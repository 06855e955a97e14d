"""A log line in its two formats (logs.py)."""

from __future__ import annotations

import json

import pytest

from gsrv.logs import format_line

pytestmark = pytest.mark.timeout(60)


def test_log_line_formats() -> None:
    fields = {"service": "up", "line": 'say "hi" = x', "exit": 0, "signal": None}
    text = format_line("text", "info", "child_stderr", fields, 0.5)
    assert text == 'ts=1970-01-01T00:00:00.500Z level=info event=child_stderr service=up line="say \\"hi\\" = x" exit=0'
    record = json.loads(format_line("json", "info", "child_stderr", fields, 0.5))
    assert record == {"ts": "1970-01-01T00:00:00.500Z", "level": "info", "event": "child_stderr", "service": "up",
                      "line": 'say "hi" = x', "exit": 0}  # fmt: skip
