"""The upgrade's state record (gsrv/upgrade/record.py) in a real sealed memfd: it reads back as
written, and a record that is not sealed, not of this version, not JSON or with a field of
the wrong type is refused with a reason, its version before anything else."""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from gsrv.upgrade.record import MAX_BYTES, SEALS, VERSION, Record, RecordError, read, write

RECORD = Record(executable="/usr/bin/python3", argv=("/usr/bin/python3", "-m", "gsrv", "serve", "-c", "g.toml"),
                gsrv_version="0.1.0", config="g.toml", overrides=("guard.max_rss=512MiB",),
                fds={"listener:echo:0": 5, "spawner": 6, "guardian": 7},
                state={"counters": {"sessions": 12}, "tokens": ["a" * 22]})  # fmt: skip


def memfd(data: bytes, seals: int = SEALS) -> int:
    fd = os.memfd_create("test-record", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_a_record_reads_back_as_written_and_cannot_be_changed() -> None:
    fd = write(RECORD)
    try:
        assert read(fd) == RECORD
        assert read(fd) == RECORD, "read again: its offset does not matter"
        with pytest.raises(PermissionError):
            os.write(fd, b"x")  # sealed: nobody rewrites it between the two codes
        assert os.get_inheritable(fd) is False, "inherited only on purpose"
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("data", "seals", "why"),
    [
        (RECORD.as_json(), 0, "not a sealed upgrade record"),
        (b"not json", SEALS, "is not JSON"),
        (b"[1, 2]", SEALS, "a JSON list, not an object"),
        (json.dumps({"version": VERSION + 1}).encode(), SEALS, f"version {VERSION + 1}; this gsrv reads version 1"),
        (json.dumps({"fds": {"spawner": "x"}}).encode(), SEALS, "version None"),  # the version first, then the rest
        (RECORD.as_json().replace(b'"spawner":6', b'"spawner":-1'), SEALS, "fd for 'spawner' is -1"),
        (RECORD.as_json().replace(b'"gsrv_version":"0.1.0"', b'"gsrv_version":1'), SEALS, "'gsrv_version' is 1"),
        (RECORD.as_json().replace(b'"g.toml"]', b"2]"), SEALS, "'argv' is"),
    ],
)
def test_a_record_that_is_not_ours_is_refused_with_the_reason(data: bytes, seals: int, why: str) -> None:
    fd = memfd(data, seals)
    try:
        with pytest.raises(RecordError, match=why.replace("(", r"\(")):
            read(fd)
    finally:
        os.close(fd)


def test_an_fd_that_is_no_memfd_is_refused() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(RecordError, match=f"fd {r} is not an upgrade record"):
            read(r)
    finally:
        os.close(r)
        os.close(w)


def test_a_record_over_its_bound_is_not_written() -> None:
    big = Record(executable="x", argv=(), gsrv_version="0", config="c", state={"blob": "y" * MAX_BYTES})
    with pytest.raises(RecordError, match="over its bound"):
        write(big)
