"""Each key is declared once (config/keys.py): the shipped conf/gsrv.toml documents every
declared key with its real default (or, shipped commented out, its declared example), and
`gsrv check --keys` prints the reference from the same declarations."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gsrv.config import keys
from gsrv.config.parse import TABLES, parse

ROOT = Path(__file__).resolve().parent.parent
PY = str(Path(__import__("sys").executable))
LINE = re.compile(r"^(#\s*)?([a-z_]+) = (.*)$")
STATED = re.compile(r"#\s*default (\S+?):")  # a value other than the default says which it replaces


def documented(text: str) -> dict[str, dict[str, tuple[bool, Any, Any]]]:
    """table -> key -> (commented out, value, the default its comment states) of each
    `key = value` line, commented or not; the first of each key in a table counts."""
    found: dict[str, dict[str, tuple[bool, Any, Any]]] = {}
    table = ""
    for line in text.splitlines():
        header = re.match(r"^\[([\w.-]+)\]", line)
        if header:
            table = header.group(1)
            continue
        match = LINE.match(line)
        if match and table:
            try:
                value = tomllib.loads(f"v = {match.group(3)}")["v"]
            except tomllib.TOMLDecodeError:
                continue  # prose that happens to look like a key
            stated = STATED.search(match.group(3))
            default = tomllib.loads(f"v = {stated.group(1)}")["v"] if stated else None
            found.setdefault(table, {}).setdefault(match.group(2), (bool(match.group(1)), value, default))
    return found


def drift(text: str) -> list[str]:
    """Where the file and the declarations disagree (the first service documents services.NAME,
    the first websocket table services.NAME.websocket, the first http table services.NAME.http;
    a value other than its default must say "# default X:" with the declared X)."""
    found = documented(text)
    services = [t for t in found if t.count(".") == 1 and t.startswith("services.")]
    first = {"services.NAME": services[:1]}
    for sub in ("websocket", "http"):
        first[f"services.NAME.{sub}"] = [t for t in found if t.startswith("services.") and t.endswith(f".{sub}")][:1]
    problems = []
    for table, classes in TABLES.items():
        where = (first.get(table) or [table])[0]
        lines = found.get(where, {})
        for name, k in (item for cls in classes for item in keys.declared(cls)):
            if name not in lines:
                problems.append(f"[{where}] {name} is not documented")
                continue
            commented, value, stated = lines[name]
            if k.required:
                if commented:
                    problems.append(f"[{where}] {name} is required: ship it set, not commented out")
            elif k.example is not None:
                if not commented or value != k.example:
                    problems.append(
                        f"[{where}] {name} must be shipped commented out as {name} = {keys.toml(k.example)}"
                    )
            elif commented or (value != k.default and stated != k.default):
                problems.append(f"[{where}] {name} must show its default: {name} = {keys.toml(k.default)}")
    return problems


def test_the_shipped_config_documents_every_key_with_its_real_default() -> None:
    text = (ROOT / "conf" / "gsrv.toml").read_text()
    assert drift(text) == []
    parse("conf/gsrv.toml", text)


def test_the_drift_check_finds_a_changed_default_and_a_missing_key() -> None:
    text = (ROOT / "conf" / "gsrv.toml").read_text()
    changed = text.replace('kill_grace = "2s"', 'kill_grace = "3s"', 1)
    assert drift(changed) == ['[server] kill_grace must show its default: kill_grace = "2s"']
    dropped = re.sub(r"^max_pending = .*$", "", text, count=1, flags=re.M)
    assert drift(dropped) == ["[services.sha256] max_pending is not documented"]
    uncommented = text.replace("# umask = ", "umask = ", 1)
    assert drift(uncommented) == ['[services.sha256] umask must be shipped commented out as umask = "0027"']


def test_every_declared_default_is_a_valid_value() -> None:
    """A default as TOML writes it goes through its own key's checks (key() reads it at import),
    and an empty service table takes exactly the declared defaults."""
    config = parse("t.toml", '[services.echo]\nlisten = "127.0.0.1:0"\ncommand = ["cat"]\n')
    svc = config.services[0]
    assert dict(keys.changed(svc)) == {
        "max_sessions": "256", "chunk_size": "64KiB", "backlog": "1024", "idle_timeout": "none",
        "session_timeout": "none", "stderr": "log", "nonzero_exit": "close", "keepalive": "60s",
        "relay": "auto", "pipe_size": "default",
    }  # fmt: skip
    assert dict(keys.changed(svc.policy)) == {"queue_timeout": "off"}  # whether a full service answers busy: shown
    assert dict(keys.changed(config.guard)) == {}
    shown = {
        "drain_announce": "off",
        "drain_timeout": "30s",
        "upgrade_wait": "10s",
        "kill_grace": "2s",
    }  # a stop's and an upgrade's length, always shown (fmt: skip)
    assert dict(keys.changed(config.server)) == shown


@pytest.mark.timeout(60)
def test_check_prints_every_key_with_its_default_doc_and_reload() -> None:
    result = subprocess.run([PY, "-m", "gsrv", "check", "--keys"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for table, classes in TABLES.items():
        for name, k in (item for cls in classes for item in keys.declared(cls)):
            row = next((line for line in out.splitlines() if line.startswith(f"[{table}] {name} ")), None)
            assert row is not None, f"--keys does not list [{table}] {name}"
            assert k.doc in row and f"SIGHUP: {k.reload}" in row
