"""`gsrv sessions`, `gsrv end ID`, `gsrv pause|resume|drain SERVICE`: the operator's view from
the command line, over HTTP to the admin listener a config names (gsrv/cli.py finds it and its
token). Nothing of gsrv's own is imported: what the server says is read as any client reads it.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

COLUMNS = (("ID", "id"), ("SERVICE", "service"), ("PEER", "peer"), ("AGE", "age_s"), ("IN", "bytes_in"),
           ("OUT", "bytes_out"), ("WAITING", "waiting"), ("PID", "pid"), ("CPU", "cpu_s"),
           ("MEM", "memory"))  # fmt: skip


class Refused(Exception):
    """The admin listener could not be reached, or said no: what to tell the person."""


class Gone(Refused):
    """Nothing listens at the admin address (a connection refused, not one left waiting)."""


def call(base: str, token: str | None, method: str, path: str, body: dict[str, object] | None = None) -> Any:
    """One request; its JSON answer. Raises Refused with a sentence a person can act on."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if method == "POST":
        headers["Content-Type"], data = "application/json", json.dumps(body or {}).encode()
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as e:
        try:
            error = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            error = e.reason
        hint = {401: " (the token: [admin] auth's file, or GSRV_ADMIN_TOKEN)",
                403: ""}.get(e.code, "")  # fmt: skip
        raise Refused(f"{base}{path}: {e.code}: {error}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        kind = Gone if isinstance(reason, ConnectionRefusedError) else Refused
        raise kind(f"no gsrv answers at {base} ({reason}): is it running with this config's [admin]?") from None


def sessions(base: str, token: str | None, service: str | None, as_json: bool) -> int:
    query = f"?service={urllib.parse.quote(service)}" if service else ""
    try:
        found = call(base, token, "GET", "/sessions" + query)["sessions"]
    except Refused as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(found, indent=2))
        return 0
    rows = [[title for title, _ in COLUMNS]] + [[_cell(name, s.get(name)) for _, name in COLUMNS] for s in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def act(base: str, token: str | None, path: str, done: str) -> int:
    """A POST (`end`, `pause`, `resume`, `drain`); prints `done` when it went through."""
    try:
        call(base, token, "POST", path)
    except Refused as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(done)
    return 0


def _cell(name: str, value: object) -> str:
    if value is None:
        return "-"
    if name in ("bytes_in", "bytes_out", "memory") and isinstance(value, int):
        return _size(value)
    if name in ("age_s", "cpu_s") and isinstance(value, int | float):
        return f"{value:.1f}s"
    return str(value)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f}{unit}"


UPGRADE_WAIT_S = 120.0  # the check, the settling (upgrade_wait, the ladders), the exec and the takeover
UPGRADE_POLL_S = 0.2
GONE_S = 10.0  # refused this long (across an exec the listener's backlog holds us instead): gsrv is gone


def upgrade(base: str, token: str | None, exec_path: str | None) -> int:
    """POST /upgrade, then GET /upgrade until the new code serves (exit 0) or the upgrade was
    refused or failed (exit 1, why printed)."""
    try:
        answer = call(base, token, "POST", "/upgrade", {"exec": exec_path} if exec_path else {})
    except Refused as e:
        print(f"Error: upgrade refused: {e}", file=sys.stderr)
        return 1
    number = answer.get("upgrade")
    deadline = time.monotonic() + UPGRADE_WAIT_S
    gone_since: float | None = None
    while time.monotonic() < deadline:
        time.sleep(UPGRADE_POLL_S)
        try:
            status = call(base, token, "GET", "/upgrade")
        except Gone as e:
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since >= GONE_S:
                print(f"Error: upgrade {number} failed: {e} for {GONE_S:g}s: gsrv stopped (its log says why: "
                      "event=upgrade_takeover_failed, reason=upgrade_failed)", file=sys.stderr)  # fmt: skip
                return 1
            continue
        except Refused:
            continue  # an answer late or cut across the exec: ask again
        gone_since = None
        last = status.get("last") or {}
        if last.get("upgrade") == number and not status.get("running"):
            if last.get("result") == "ok":
                print(
                    f"upgraded: upgrade {number}, from gsrv {last.get('from_version')}, {last.get('moved')} "
                    f"session(s) moved, {last.get('ended')} ended, exec to serving {last.get('exec_ms')} ms"
                )
                return 0
            print(f"Error: upgrade {number} {last.get('result')}: {last.get('why')}", file=sys.stderr)
            return 1
    print(f"Error: upgrade {number}: no result within {UPGRADE_WAIT_S:g}s (see gsrv's log)", file=sys.stderr)
    return 1
