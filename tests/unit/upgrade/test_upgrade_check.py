"""`gsrv upgrade --check` (gsrv/upgrade/check.py): the new code reads a real sealed record and
the config it names, and answers ok or why not (as its own process: tests/test_upgrade.py)."""

from __future__ import annotations

import io
import os
import sys

import pytest

from gsrv.spawn import wire
from gsrv.upgrade.check import check
from gsrv.upgrade.record import Record, write

GOOD = '[services.echo]\nlisten = "127.0.0.1:0"\ncommand = ["cat"]\n'


def record(config: str, **changes: object) -> Record:
    fields: dict[str, object] = {"executable": sys.executable, "argv": (sys.executable, "-m", "gsrv", "serve"),
                                 "gsrv_version": "0.1.0", "config": config, "fds": {"listener:echo:0": 5, "spawner": 6},
                                 "state": {"spawner": {"wire": wire.VERSION}}}  # fmt: skip
    return Record(**(fields | changes))  # type: ignore[arg-type]


def answer(rec: Record) -> tuple[int, str]:
    fd = write(rec)
    out = io.StringIO()
    try:
        return check(fd, out), out.getvalue()
    finally:
        os.close(fd)


@pytest.fixture
def config(tmp_path) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / "gsrv.toml"
    path.write_text(GOOD)
    return str(path)


def test_a_record_this_code_can_take_is_answered_ok(config: str) -> None:
    code, said = answer(record(config))
    assert code == 0 and said.startswith("upgrade_check ok: ") and "1 service(s)" in said, said


def test_a_config_error_is_refused_with_its_key_named(config: str) -> None:
    code, said = answer(record(config, overrides=("server.kill_grace=forever",)))
    assert code == 2 and said.startswith("upgrade_check refused: ") and "kill_grace" in said, said


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"fds": {"listener:echo:0": 5, "printer": 9}}, "cannot take over: printer"),
        ({"state": {"spawner": {"wire": wire.VERSION + 1}}}, f"speaks wire version {wire.VERSION + 1}"),
        ({"state": {}}, "speaks wire version None"),
    ],
)
def test_what_this_code_cannot_take_is_refused_with_the_reason(config: str, changes: dict[str, object],
                                                              why: str) -> None:  # fmt: skip
    code, said = answer(record(config, **changes))
    assert code == 2 and why in said, said
