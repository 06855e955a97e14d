"""One gsrv for a benchmark: its config written, `gsrv serve` started with the log in a file,
and the addresses its `listening` and `admin_listening` lines name, once all are up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time


def serve(tmp: str, config: str, count: int) -> tuple[subprocess.Popen[bytes], dict[str, tuple[str, int]], str]:
    """The process, {service (or "admin"): (host, port)} once `count` addresses are listed, and
    the log's path. SystemExit naming the log when gsrv does not start within 20 s."""
    path, log_path = os.path.join(tmp, "gsrv.toml"), os.path.join(tmp, "gsrv.log")
    with open(path, "w") as f:
        f.write(config)
    log = open(log_path, "w+")  # noqa: SIM115 (the process writes it)
    proc = subprocess.Popen([sys.executable, "-m", "gsrv", "serve", "-c", path], stderr=log)
    found: dict[str, tuple[str, int]] = {}
    deadline = time.monotonic() + 20
    while len(found) < count:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"gsrv did not start; its log is {log_path}")
        time.sleep(0.05)
        log.seek(0)
        for name, host, port in re.findall(r"event=(?:listening service=(\S+)|admin_listening) address=([\d.]+):(\d+)",
                                           log.read()):  # fmt: skip
            found[name or "admin"] = (host, int(port))
    return proc, found, log_path
