"""The package's shape: who may import whom (DESIGN.md "Modules and who may import whom"), and
a wheel that ships every subpackage and runs from a fresh venv."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Callable

import pytest
from conftest import C_SPAWNER_BUILT

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gsrv"

# part -> the parts it may import (itself always). A part is a subpackage or a top-level module.
LEAVES = {"errors", "logs", "periodic", "loop", "workers"}
MAY_IMPORT = {
    "errors": set(),
    "logs": set(),
    "periodic": set(),
    "loop": set(),
    "workers": set(),
    "contain": set(),
    "config": {"errors", "contain"},
    "accept": {"config", "contain"} | LEAVES,
    "edge": {"config"} | LEAVES,
    "spawn": {"contain", "errors", "logs", "loop"},
    "relay": {"edge", "config", "contain", "spawn"} | LEAVES,
    "ops": {"accept", "config", "state"} | LEAVES,
    "clients": set(),
    "upgrade": {"errors", "config", "spawn", "relay", "edge", "contain", "state", "server", "service", "__init__"}
    | LEAVES,
    "state": LEAVES,
    "service": {"accept", "edge", "relay", "ops", "config", "state"} | LEAVES,
    "server": {"service", "state", "accept", "relay", "ops", "config", "contain"} | LEAVES,
    "compose": {"server", "state", "accept", "relay", "ops", "config", "contain", "spawn", "upgrade"} | LEAVES,
    "cli": {
        "compose",
        "server",
        "state",
        "accept",
        "edge",
        "relay",
        "ops",
        "clients",
        "config",
        "contain",
        "spawn",
        "upgrade",
    }
    | {"__init__"}
    | LEAVES,
    "__main__": {"cli"},
    "__init__": set(),
}


def _part(module: str) -> str:
    """gsrv.relay.session -> relay; gsrv.cli -> cli; gsrv -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").exists()


def _imports(path: pathlib.Path) -> set[str]:
    """The gsrv modules a file imports ("from gsrv import __version__" imports gsrv itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "gsrv" or a.name.startswith("gsrv.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gsrv":
                found |= {f"gsrv.{a.name}" if _is_module(a.name) else "gsrv" for a in node.names}
            elif node.module.startswith("gsrv."):
                found.add(node.module)
    return found


def _module(path: pathlib.Path) -> str:
    return ".".join(("gsrv", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def test_every_module_belongs_to_a_part_with_rules():
    for path in PACKAGE.rglob("*.py"):
        assert _part(_module(path)) in MAY_IMPORT, f"{path}: a new part needs its row in MAY_IMPORT and DESIGN.md"


def _broken(module: str, path: pathlib.Path) -> list[str]:
    own = _part(module)
    return [
        f"{module} imports {imported} ({own} may import only {sorted(MAY_IMPORT[own])})"
        for imported in sorted(_imports(path))
        if _part(imported) != own and _part(imported) not in MAY_IMPORT[own]
    ]


def _every_module(check: Callable[[str, pathlib.Path], list[str]]) -> list[str]:
    """What `check` finds wrong in each of gsrv's modules."""
    return [line for path in sorted(PACKAGE.rglob("*.py")) for line in check(_module(path), path)]


def test_imports_run_one_way():
    broken = _every_module(_broken)
    assert not broken, "\n".join(broken)


def test_the_rules_catch_an_import_that_runs_back_up(tmp_path):
    """The check itself can fail: an edge module importing the relay is found, its errors import is not."""
    bad = tmp_path / "bad.py"
    bad.write_text("from gsrv.relay.session import Session\nfrom gsrv import errors\n")
    assert _imports(bad) == {"gsrv.relay.session", "gsrv.errors"}
    assert _broken("gsrv.edge.door", bad) == [
        "gsrv.edge.door imports gsrv.relay.session "
        "(edge may import only ['config', 'errors', 'logs', 'loop', 'periodic', 'workers'])"
    ]


# Inside relay/, a transport's folder never reaches into another's: what both need lives in relay/ itself.
APART = ("gsrv.relay.http", "gsrv.relay.ws")


def _reaches_across(module: str, path: pathlib.Path) -> list[str]:
    own = next((t for t in APART if module == t or module.startswith(t + ".")), None)
    others = [t for t in APART if own is not None and t != own]
    return [f"{module} imports {imported}" for imported in sorted(_imports(path))
            if any(imported == o or imported.startswith(o + ".") for o in others)]  # fmt: skip


def test_relay_transports_stay_apart():
    broken = _every_module(_reaches_across)
    assert not broken, "\n".join(broken)


def test_the_transport_rule_catches_a_reach_across(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from gsrv.relay.ws.window import Window\nfrom gsrv.relay.pump import move\n")
    assert _reaches_across("gsrv.relay.http.relay", bad) == ["gsrv.relay.http.relay imports gsrv.relay.ws.window"]
    assert _reaches_across("gsrv.relay.session", bad) == []


def test_subpackages_have_empty_inits():
    for init in PACKAGE.glob("*/**/__init__.py"):
        assert init.read_text() == "", f"{init}: keep subpackage __init__.py files empty"


@pytest.mark.timeout(300)
def test_a_wheel_ships_every_subpackage_and_runs_from_a_fresh_venv(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=240,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("gsrv-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=120,
        cwd=tmp_path,
    )  # fmt: skip
    # The dependencies come from this venv's site-packages: a path line, which processes none
    # of its .pth files, so the editable gsrv there stays out and gsrv comes from the wheel.
    pathlib.Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shipped = {p.relative_to(site).as_posix() for p in pathlib.Path(site, "gsrv").rglob("*.py")}
    expected = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")}
    assert shipped == expected
    assert pathlib.Path(site, "gsrv", "py.typed").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [python, "-c", "import gsrv; print(gsrv.__file__)"], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=60, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(site), where.stdout
    gsrv = [str(venv / "bin" / "gsrv")]
    version = subprocess.run([*gsrv, "--version"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("gsrv "), version
    check = subprocess.run(
        [*gsrv, "check", "-c", str(ROOT / "conf" / "gsrv.toml")], capture_output=True, text=True, cwd=tmp_path,
        env=env, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    shipped = len(tomllib.loads((ROOT / "conf" / "gsrv.toml").read_text())["services"])
    assert f"ok, {shipped} service(s)" in check.stdout
    # the build compiled the spawner in C into the wheel, and gsrv takes it (unless CI's fallback run)
    impl = "c" if C_SPAWNER_BUILT else "python"
    assert pathlib.Path(site, "gsrv", "spawn", "gsrv-spawner").exists() == C_SPAWNER_BUILT
    assert f"  spawner: {impl} (auto" in check.stdout, check.stdout


@pytest.mark.timeout(120)
def test_the_unit_tier_refuses_a_socket_and_a_process(tmp_path):
    """tests/inprocess.py fails a test under unit/ that leaves the process, and only that one."""
    unit = tmp_path / "unit"
    unit.mkdir()
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["inprocess"]\n')
    (unit / "test_leaks.py").write_text(
        "import socket, subprocess\n\n"
        "def test_a_socket():\n    socket.socketpair()\n\n"
        "def test_a_process():\n    subprocess.run(['true'])\n\n"
        "def test_in_process():\n    assert sum(range(4)) == 6\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(unit)],
                         capture_output=True, text=True, timeout=100, cwd=tmp_path, env=env)  # fmt: skip
    assert "2 failed, 1 passed" in run.stdout, run.stdout
    assert "a unit test opened a socket" in run.stdout and "a unit test started a process" in run.stdout, run.stdout
