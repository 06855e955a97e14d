"""`gsrv upgrade --check` as its own process, the record on an inherited fd, as the running gsrv
will start it (issue 38, being built)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gsrv.spawn import wire
from gsrv.upgrade.record import Record, write

GOOD = '[services.echo]\nlisten = "127.0.0.1:0"\ncommand = ["cat"]\n'


@pytest.mark.timeout(60)
def test_the_check_runs_as_its_own_process_with_the_record_on_an_inherited_fd(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "gsrv.toml"
    config.write_text(GOOD)
    fd = write(Record(executable=sys.executable, argv=(sys.executable,), gsrv_version="0.1.0", config=str(config),
                      fds={"spawner": 6}, state={"spawner": {"wire": wire.VERSION}}))  # fmt: skip
    try:
        run = subprocess.run([sys.executable, "-m", "gsrv", "upgrade", "--check", "--record-fd", str(fd)],
                             pass_fds=(fd,), capture_output=True, text=True, timeout=50)  # fmt: skip
        assert run.returncode == 0 and run.stdout.startswith("upgrade_check ok: "), (run.stdout, run.stderr)
        bare = subprocess.run([sys.executable, "-m", "gsrv", "upgrade"], capture_output=True, text=True, timeout=50)
        assert bare.returncode == 2 and "only `gsrv upgrade --check --record-fd FD` is built yet" in bare.stderr
    finally:
        os.close(fd)
