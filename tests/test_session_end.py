"""A session's end has one owner: whatever raises inside it, its child's whole process group is
stopped and reaped before its slot frees, and exactly one session_end line says internal_error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["direction", "facts", "close"])
def test_a_relay_that_raises_mid_transfer_still_ends_the_session_whole(where: str, tmp_path: Path) -> None:
    log = tmp_path / "gsrv.log"
    probe = subprocess.run(
        [sys.executable, str(HERE / "session_probe.py"), where, str(log)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert seen["active_while_running"] == 1
    assert seen["bytes_in"] >= 64 * 1024, "the bug must strike mid-transfer, after bytes moved"
    assert seen["reaped"] is True and seen["group_alive"] is False, f"the process group outlived its session: {seen}"
    assert seen["active"] == 1, "the slot must still be held while the session ends (it frees after the reap)"
    assert seen["active_after"] == 0
    assert seen["client_saw"] == "reset", "a session that failed must not look complete to its client"
    assert seen.get("cgroups_left", []) == [], "the session's cgroups must be gone with it"
    ends = [line for line in log.read_text().splitlines() if "event=session_end" in line]
    assert len(ends) == 1, ends
    assert "reason=internal_error" in ends[0] and "mid-transfer" in log.read_text()
