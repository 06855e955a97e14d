"""The fast tier's rule, as a pytest plugin (tests/conftest.py loads it): a test under a folder
named `unit` (tests/unit: `make unit`) is in-process only. One that opens a socket or starts a
process fails, saying where it belongs: beside the real gsrv in tests/. (A plugin, not a
conftest.py in tests/unit: two modules named conftest would shadow each other's helpers.)"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

# Audit events that leave the process: a socket (any family: a socketpair too), a new process.
LEAVING = {"socket.__new__": "opened a socket", "subprocess.Popen": "started a process",
           "os.posix_spawn": "started a process", "os.fork": "forked", "os.exec": "exec'd"}  # fmt: skip
_guarding = [False]


def _audit(event: str, _args: tuple[object, ...]) -> None:
    if _guarding[0] and event in LEAVING:
        _guarding[0] = False  # once: pytest's own reporting may need what it refuses
        raise RuntimeError(f"a unit test {LEAVING[event]}: tests/unit is in-process only (no socket, no "
                           "subprocess); a test that needs one belongs in tests/ beside the real gsrv")  # fmt: skip


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _in_process_only(request: pytest.FixtureRequest) -> Iterator[None]:
    _guarding[0] = "unit" in request.node.path.parent.parts
    try:
        yield
    finally:
        _guarding[0] = False
