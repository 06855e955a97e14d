"""Which spawner may run (config/spawner.py): the compiled one only as a regular executable file
of root's or gsrv's own user's that neither its group nor anyone else may write."""

from __future__ import annotations

import os

import pytest

from gsrv.config.spawner import c_spawner_problem

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("mode", "owner", "problem"),
    [
        (0o755, None, None),
        (0o700, None, None),
        (0o775, None, "may be written by its group or by anyone (mode 775)"),
        (0o757, None, "may be written by its group or by anyone (mode 757)"),
        (0o644, None, "is not an executable file"),
        (0o755, 54321, "belongs to uid 54321, neither root nor gsrv's user"),
    ],
)
def test_the_compiled_spawner_runs_only_if_nobody_else_may_change_it(tmp_path, mode, owner, problem):
    program = tmp_path / "gsrv-spawner"
    program.write_bytes(b"\x7fELF")
    program.chmod(mode)
    if owner is not None:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(program, owner, -1)
    found = c_spawner_problem(str(program))
    assert found == (None if problem is None else f"{program} {problem}")


def test_one_not_built_says_so(tmp_path):
    assert c_spawner_problem(str(tmp_path / "gsrv-spawner")) == (
        f"{tmp_path / 'gsrv-spawner'} was not built (the package's build compiles it when a C compiler is there)"
    )
