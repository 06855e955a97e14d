"""contrib/prometheus/: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`, Debian's prometheus package), and every metric they read is one a real
gsrv exports (so a renamed metric cannot leave a rule that never fires)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request

import pytest
from conftest import ROOT, service_toml

RULES = ROOT / "contrib" / "prometheus"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="needs promtool (Debian's prometheus: .ci/run installs it; under CI=true this fails instead)",
)


@pytest.mark.timeout(60)
def test_promtool_checks_the_rules_and_runs_their_tests() -> None:
    check = subprocess.run([PROMTOOL or "promtool", "check", "rules", "gsrv.rules.yml"], cwd=RULES,
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    assert check.returncode == 0 and "SUCCESS: 6 rules found" in check.stdout, check.stdout + check.stderr
    tested = subprocess.run([PROMTOOL or "promtool", "test", "rules", "gsrv.rules.test.yml"], cwd=RULES,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    alerts = re.findall(r"^\s+- alert: (\w+)$", (RULES / "gsrv.rules.yml").read_text(), re.M)
    assert sorted(set(re.findall(r"alertname: (\w+)", (RULES / "gsrv.rules.test.yml").read_text()))) == sorted(alerts)


@pytest.mark.timeout(60)
def test_every_metric_the_rules_read_is_one_gsrv_exports(gsrv) -> None:
    server = gsrv('[admin]\nlisten = "127.0.0.1:0"\n' + service_toml("echo", ["cat"]))
    base = "http://" + server.wait_log(r"event=admin_listening address=\S+").split("address=")[1].split()[0]
    with urllib.request.urlopen(base + "/metrics", timeout=10) as reply:
        names = set(re.findall(r"^# TYPE (\w+) \w+$", reply.read().decode(), re.M))  # (a counter's with _total)
    read = set(re.findall(r"\b(gsrv_\w+)", (RULES / "gsrv.rules.yml").read_text()))
    assert read and read <= names, read - names
