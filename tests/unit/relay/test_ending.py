"""The end rules (relay/ending.py), row by row as DESIGN.md's end table states them, without a
socket or a child: each case feeds facts in time order and checks every answer."""

from __future__ import annotations

import pytest

from gsrv.relay.ending import FAILURES, POLL_S, EndRules, Facts, Verdict, ending_of
from gsrv.relay.pump import End

GRACE = 1.0
WELL = {"exited": True, "ended_well": True}

# (name, idle_timeout, session_timeout, [(facts, expected verdict or wait)])
ROWS = [
    ("client EOF reached the child, its output ended, it exited well: eof, FIN",
     0, 0, [(Facts(now=5, input_done=True, output_eof=True, **WELL), Verdict("eof", True))]),
    ("pty: the client's input ended in raw mode, gsrv hung the terminal up, the child ended: hangup, FIN",
     0, 0, [(Facts(now=5, input_done=True, hung_up=True, output_eof=True, **WELL), Verdict("hangup", True))]),
    ("output ended and the child exited before the client's input ended: child_exit, FIN",
     0, 0, [(Facts(now=5, output_eof=True, **WELL), Verdict("child_exit", True))]),
    ("non-zero exit with nonzero_exit = reset, or a signal it did not get from gsrv: a reset",
     0, 0, [(Facts(now=5, input_done=True, output_eof=True, exited=True), Verdict("eof", False))]),
    ("output ended, the child runs on past eof_grace: a reset",
     0, 0, [(Facts(now=5, input_done=True, output_eof=True), GRACE),
            (Facts(now=5.4, input_done=True, output_eof=True), pytest.approx(0.6)),
            (Facts(now=6, input_done=True, output_eof=True), Verdict("eof", False))]),
    ("output ended, the child exits within eof_grace: a clean end",
     0, 0, [(Facts(now=5, output_eof=True), GRACE),
            (Facts(now=5.5, output_eof=True, **WELL), Verdict("child_exit", True))]),
    ("the child exited, a grandchild holds its stdout, nothing flows for eof_grace: child_exit, FIN if it ended well",
     0, 0, [(Facts(now=5, input_done=True, **WELL), POLL_S),
            (Facts(now=5.9, input_done=True, **WELL), POLL_S),
            (Facts(now=6, input_done=True, **WELL), Verdict("child_exit", True))]),
    ("... and a reset if it did not end well",
     0, 0, [(Facts(now=5, exited=True), POLL_S), (Facts(now=6, exited=True), Verdict("child_exit", False))]),
    ("... the grace counts only while nothing flows",
     0, 0, [(Facts(now=5, **WELL), POLL_S),
            (Facts(now=5.8, output_in_flight=True, **WELL), POLL_S),
            (Facts(now=6.5, **WELL), POLL_S),
            (Facts(now=7.4, **WELL), POLL_S),
            (Facts(now=7.5, **WELL), Verdict("child_exit", True))]),
    ("no byte either way for idle_timeout: a reset",
     3, 0, [(Facts(now=5, last_activity=4), 2), (Facts(now=7, last_activity=4), Verdict("idle_timeout", False))]),
    ("session_timeout reached: a reset (the session started at 0)",
     0, 10, [(Facts(now=4, last_activity=4), 6), (Facts(now=10, last_activity=10), Verdict("session_timeout", False))]),
    ("the nearest deadline is the wait: eof_grace, then session_timeout's 2 s before idle_timeout's 2.5 s",
     3, 10, [(Facts(now=8, last_activity=8, output_eof=True), GRACE), (Facts(now=8, last_activity=7.5), 2)]),
    ("nothing to wait for: until a fact changes",
     0, 0, [(Facts(now=5), None)]),
    ("an abort (relay failure, watchdog, drain, bug) wins over a clean end: a reset",
     0, 0, [(Facts(now=5, aborted="shutdown", input_done=True, output_eof=True, **WELL), Verdict("shutdown", False))]),
    ("a timeout wins over a child still running after its output ended",
     3, 0, [(Facts(now=5, output_eof=True, last_activity=1), Verdict("idle_timeout", False))]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "idle", "limit", "steps"), ROWS, ids=[row[0][:60] for row in ROWS])
def test_end_rules(name: str, idle: float, limit: float, steps: list[tuple[Facts, object]]) -> None:
    rules = EndRules(started=0.0, eof_grace=GRACE, idle_timeout=idle, session_timeout=limit)
    for facts, expected in steps:
        assert rules.decide(facts) == expected, f"{name}: at {facts}"


def test_a_detached_session_ends_when_its_reattach_window_passes() -> None:
    rules = EndRules(started=0.0, eof_grace=GRACE, idle_timeout=0, session_timeout=0, reattach=300)
    assert rules.decide(Facts(now=5)) is None  # attached: nothing to wait for
    assert rules.decide(Facts(now=10, detached_since=10)) == 300
    assert rules.decide(Facts(now=109, detached_since=10)) == 201
    assert rules.decide(Facts(now=310, detached_since=10)) == Verdict("reattach_expired", False)
    assert rules.decide(Facts(now=320)) is None  # (reattached meanwhile: the window counts from the next drop)


def test_failures_name_the_side_that_failed() -> None:
    assert FAILURES == {
        ("in", End.SOURCE_ERROR): "client_reset",
        ("out", End.SINK_CLOSED): "client_reset",
        ("out", End.SOURCE_ERROR): "child_exit",
    }


@pytest.mark.parametrize(
    ("status", "signal_in_exit", "expected"),
    [
        (0, False, (0, None, None)),
        (3 << 8, False, (3, None, None)),
        (15, False, (None, 15, "TERM")),  # killed by SIGTERM
        (9 | 0x80, False, (None, 9, "KILL")),  # and dumped core
        (137 << 8, False, (137, None, None)),  # a plain exit 137: no sandbox, no signal
        (137 << 8, True, (None, 9, "KILL")),  # bwrap's 128 + 9
        (170 << 8, True, (None, 42, "42")),  # a real-time signal: no name of its own
        (200 << 8, True, (200, None, None)),  # 72 is no signal here: an exit
        (0x137F, False, (None, None, None)),  # stopped (WIFSTOPPED): no end yet
    ],
)
def test_a_status_word_reads_as_an_exit_or_a_signal(status, signal_in_exit, expected):
    assert ending_of(status, signal_in_exit) == expected
