"""No orphans: a small guardian process ends every session's process group when gsrv dies.

Children run in sessions of their own (so a supervisor's group kill does not reach them),
and a gsrv killed with SIGKILL cannot end them itself. gsrv tells the guardian, through a
pipe, each process group it starts ("+PGID") and reaps ("-PGID"); when the pipe reaches EOF
(gsrv is gone, however it ended) the guardian sends TERM, then KILL, to the groups left.
Run as `python -m gsrv.guardian`; it ignores SIGINT, SIGTERM and SIGHUP: only EOF ends it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 2.0


class Guardian:
    """gsrv's side: starts the guardian and reports process groups to it (one small write each)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gsrv.guardian"], stdin=subprocess.PIPE, bufsize=0,
            close_fds=True, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdin is not None
        self._fd = self.proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        self._pending = b""

    def _send(self, line: bytes) -> None:
        data = self._pending + line
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError:  # the guardian is gone: nothing left to tell
            written = len(data)
        self._pending = data[written:][-65536:]  # bounded; the guardian reads as fast as we spawn

    def track(self, pgid: int) -> None:
        self._send(b"+%d\n" % pgid)

    def untrack(self, pgid: int) -> None:
        self._send(b"-%d\n" % pgid)

    def close(self) -> None:
        """A clean stop: every group was reaped; EOF lets the guardian exit at once."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()


def _end_groups(groups: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in list(groups):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                groups.discard(pgid)
        deadline = time.monotonic() + GRACE_S
        while groups and time.monotonic() < deadline:
            time.sleep(0.05)
            for pgid in list(groups):
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    groups.discard(pgid)


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        sign, number = line[:1], line[1:].strip()
        if number.isdigit():
            (groups.add if sign == b"+" else groups.discard)(int(number))
    if groups:
        _end_groups(groups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
