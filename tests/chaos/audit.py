"""The audit every chaos scenario ends with: each session accounted for in the log with the
right reason, each completed transfer exact, and gsrv back to its baseline: greenlets (as
gsrv's SIGUSR1 dump counts them), fds, children, no zombie, no leftover grandchild, RSS
within its bound.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from dataclasses import dataclass

import psutil
from conftest import Gsrv, wait_until
from mix import MARK, SERVICES, Outcome

FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def fields(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in FIELD.findall(line)}


@dataclass
class Snapshot:
    greenlets: int
    fds: int
    children: int
    sessions: int
    pending: int
    rss: int


def snapshot(server: Gsrv) -> Snapshot:
    """Ask gsrv for a dump (SIGUSR1) and read it from the log."""
    mark = len(server.lines)
    server.signal(signal.SIGUSR1)
    found = fields(server.wait_log(r"event=dump ", start=mark))
    return Snapshot(int(found["greenlets"]), int(found["fds"]), int(found["children"]), int(found["sessions"]),
                    int(found["pending"]), server.rss())  # fmt: skip


def settle(server: Gsrv, base: Snapshot, timeout: float = 30.0) -> Snapshot:
    """Wait until gsrv is back to base: no session, nothing pending, the same greenlets,
    fds and children."""
    last: list[Snapshot] = []

    def back() -> bool:
        now = snapshot(server)
        last[:] = [now]
        return (now.sessions, now.pending, now.greenlets, now.fds, now.children) == (
            0, 0, base.greenlets, base.fds, base.children)  # fmt: skip

    wait_until(back, timeout, lambda: f"gsrv back to its baseline {base}, last {last}", interval=0.5)
    return last[0]


def no_leftovers(server: Gsrv, rss_bound: int, running: bool = True) -> None:
    """No zombie or child below gsrv, no orphaned grandchild anywhere, RSS within its bound
    (when gsrv has exited: no grandchild, and no traceback in its log)."""
    if running:
        zombies = [p.pid for p in server.ps.children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]
        assert not zombies, f"zombies below gsrv: {zombies}"
        assert not server.children(), f"children left: {server.children()}"
        assert server.rss() < rss_bound, f"gsrv RSS {server.rss()} over its bound {rss_bound}"
    leftovers = []
    for p in psutil.process_iter(["cmdline"]):
        if p.info["cmdline"] and p.info["cmdline"][-1:] == [MARK]:
            leftovers.append(p.pid)
    assert not leftovers, f"grandchildren outlived their sessions: {leftovers}"
    assert not any("Traceback" in line for line in server.lines), "a traceback in gsrv's log"


def sessions(server: Gsrv, service: str) -> dict[int, list[dict[str, str]]]:
    """The session_end lines of a service, by the client's port, in the log's order (a
    port's sessions never overlap, so its k-th line is its k-th session's)."""
    found: dict[int, list[dict[str, str]]] = {}
    for line in server.lines:
        if "event=session_end" in line and f"service={service} " in line:
            f = fields(line)
            found.setdefault(int(f["peer"].rsplit(":", 1)[1]), []).append(f)
    return found


def account(server: Gsrv, outcomes: list[Outcome], also: tuple[str, ...] = ()) -> Counter[str]:
    """Each client's session has exactly one log line, with its kind's reason (or one of
    `also`, as `shutdown` for a drain); a session that ended with its kind's reason got
    exactly the right bytes. Returns the reasons counted."""
    reasons: Counter[str] = Counter()
    problems = []
    lines = {name: sessions(server, name) for name in SERVICES}
    for o in sorted(outcomes, key=lambda o: o.started):
        expected = SERVICES[o.service][2]
        same_port = lines[o.service].get(o.port)
        line = same_port.pop(0) if same_port else None
        if line is None:
            if "shutdown" in also:  # it was in the backlog when the drain closed the listener
                reasons["never_accepted"] += 1
                continue
            problems.append(f"{o.service} port {o.port}: no session_end line ({o.detail})")
            continue
        reason = line["reason"]
        reasons[reason] += 1
        if reason not in (*expected, *also):
            why = f" error={line['error']}" if line.get("error") else ""
            problems.append(f"{o.service} port {o.port}: reason={reason}{why}, expected {expected} ({o.detail})")
        elif reason in expected and not o.ok:
            problems.append(f"{o.service} port {o.port}: bytes not exact ({o.detail}); log: {line}")
    extra = {name: [port for port, left in ports.items() if left] for name, ports in lines.items()}
    extra = {name: ports for name, ports in extra.items() if ports}
    assert not extra, f"session_end lines no client accounts for: {extra}"
    assert not problems, f"{len(problems)} of {len(outcomes)} sessions wrong:\n" + "\n".join(problems[:20])
    return reasons


def wait_quiet(server: Gsrv, count: int, timeout: float = 30.0) -> None:
    """Until at least `count` session_end lines are in the log."""
    wait_until(lambda: server.count_log(r"event=session_end") >= count, timeout, f"{count} session_end lines")


def rss_bound(base: Snapshot) -> int:
    return base.rss + 64 * 1024 * 1024
