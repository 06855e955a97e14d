"""The benchmark in its smoke mode (tiny sizes, one run, gsrv only), so it cannot rot.
No timing is asserted: only that every measure ran and the report was written."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PY, ROOT


@pytest.mark.timeout(300)
def test_bench_smoke_mode_runs_every_measure(tmp_path: Path) -> None:
    result = subprocess.run([PY, "bench/bench.py", "--smoke", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=280, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "latest.md").read_text()
    for measure in ("into wc -c", "echo through cat", "slow child", "stalled sessions", "sessions/s", "half-close"):
        assert measure in report, f"{measure} missing from the report"
    assert "| half-close: answer 1 s after EOF | delivered | delivered |" in report
    if shutil.which("busybox") and shutil.which("ab"):  # .ci/run installs both
        assert "| busybox httpd -i under ApacheBench" in report and "| lost | 0.0 |" in report
    assert "failed" not in report
