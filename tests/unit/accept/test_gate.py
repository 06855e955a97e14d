"""The gate (accept/gate.py) in-process, with a fake handler and a fake listener: the slots,
the queue of preludes done, parking on a resource error and the retry when a session ends,
a kept-alive connection's knock, SPAWNS_IN_FLIGHT, and close; and its decision (may_accept)
as a pure function. No socket: the listener only records what the gate told it."""

from __future__ import annotations

import errno
import os

import gevent
import pytest
from gevent.event import Event

from gsrv.accept.gate import SPAWNS_IN_FLIGHT, Gate, may_accept
from gsrv.accept.handler import ENDED
from gsrv.accept.held import Held
from gsrv.logs import Log

pytestmark = pytest.mark.timeout(30)


class FakeListener:
    """What the gate drives of a listener: whether it accepts."""

    def __init__(self) -> None:
        self.closed = False
        self.started = True
        self.accepting = True

    def start_accepting(self) -> None:
        self.accepting = True

    def stop_accepting(self) -> None:
        self.accepting = False


class FakeHandler:
    """Connections are names; each step waits on an event the test sets, and is recorded."""

    def __init__(self, has_prelude: bool = False) -> None:
        self.has_prelude = has_prelude
        self.steps: list[tuple[str, str]] = []
        self.prelude_go: dict[str, Event] = {}
        self.prelude_says: dict[str, bool] = {}
        self.start_says: dict[str, int | None] = {}  # an errno (parked), None (ended): else a session
        self.spawned_go: dict[str, Event] = {}
        self.spawned_says: dict[str, int | None] = {}
        self.end: dict[str, Event] = {}
        self.dropped: dict[str, str] = {}

    def arrive(self, sock: str, address: object) -> str | None:
        self.steps.append(("arrive", sock))
        return None if sock.startswith("refused") else sock

    def prelude(self, conn: str) -> str | None:
        self.steps.append(("prelude", conn))
        self.prelude_go.setdefault(conn, Event()).wait()
        return conn if self.prelude_says.get(conn, True) else None

    def start(self, conn: str) -> str | int | None:
        self.steps.append(("start", conn))
        said = self.start_says.pop(conn, "session")
        return f"session-{conn}" if said == "session" else said

    def spawned(self, session: str) -> int | None:
        conn = session.removeprefix("session-")
        self.spawned_go.setdefault(conn, Event()).wait()
        return self.spawned_says.pop(conn, None)

    def run(self, session: str) -> None:
        conn = session.removeprefix("session-")
        self.steps.append(("run", conn))
        self.end.setdefault(conn, Event()).wait()

    def drop(self, conn: str, reason: str, error: str | None = None) -> None:
        self.dropped[conn] = reason

    def busy(self, conn: str) -> None:
        self.steps.append(("busy", conn))

    def prelude_done(self, conn: str) -> None:
        self.prelude_go.setdefault(conn, Event()).set()

    def session_ends(self, conn: str) -> None:
        self.end.setdefault(conn, Event()).set()

    def started(self) -> list[str]:
        return [conn for step, conn in self.steps if step == "run"]


def settle() -> None:
    """Every greenlet ready runs (a few turns of the loop: spawns, links, their callbacks)."""
    for _ in range(5):
        gevent.sleep(0)


@pytest.fixture
def log(tmp_path):
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    yield Log(fd)
    os.close(fd)


def gate_with(handler: FakeHandler, log: Log, max_sessions: int = 2) -> tuple[Gate[str, str], FakeListener]:
    gate: Gate[str, str] = Gate("svc", max_sessions, log, handler)
    listener = FakeListener()
    gate.attach(listener)  # type: ignore[arg-type]
    return gate, listener


def run_at_once(handler: FakeHandler, *conns: str) -> None:
    for conn in conns:
        handler.spawned_go.setdefault(conn, Event()).set()


@pytest.mark.parametrize(
    ("active", "limit", "paused", "pending", "max_pending", "accepts"),
    [(0, 1, set(), 0, 1, True), (1, 1, set(), 0, 1, False), (0, 5, {"memory"}, 0, 1, False),
     (0, 5, set(), 1, 1, False), (0, 5, set(), 1, 2, True), (4, 5, {"draining", "memory"}, 0, 9, False)],
)  # fmt: skip
def test_the_decision(active, limit, paused, pending, max_pending, accepts) -> None:
    assert may_accept(active, limit, paused, pending, max_pending) is accepts


def test_slots_stop_accept_when_full_and_reopen_when_a_session_ends(log) -> None:
    handler = FakeHandler()
    gate, listener = gate_with(handler, log, max_sessions=2)
    run_at_once(handler, "a", "b", "c")
    gate.admit("a", None)
    assert listener.accepting
    gate.admit("b", None)
    settle()
    assert handler.started() == ["a", "b"] and gate.active == 2 and not listener.accepting
    gate.admit("refused-1", None)  # a rule refused it in arrive: nothing counted
    assert gate.active == 2
    handler.session_ends("a")
    settle()
    assert gate.active == 1 and listener.accepting


def test_a_prelude_runs_without_a_slot_and_queues_for_one(log) -> None:
    handler = FakeHandler(has_prelude=True)
    gate, listener = gate_with(handler, log, max_sessions=1)
    gate.set_limits(1, 2)  # max_pending 2
    run_at_once(handler, "a", "b")
    gate.admit("a", None)
    gate.admit("b", None)
    settle()
    assert gate.pending == 2 and not listener.accepting  # both in their prelude: max_pending reached
    handler.prelude_done("b")
    handler.prelude_done("a")
    settle()
    assert handler.started() == ["b"] and list(gate.ready) == ["a"]  # b finished first; a waits for the slot
    handler.session_ends("b")
    settle()
    assert handler.started() == ["b", "a"] and not gate.ready


def test_a_prelude_that_ends_its_connection_frees_its_place(log) -> None:
    handler = FakeHandler(has_prelude=True)
    gate, listener = gate_with(handler, log)
    handler.prelude_says["a"] = False
    gate.admit("a", None)
    settle()
    assert not listener.accepting
    handler.prelude_done("a")
    settle()
    assert gate.pending == 0 and handler.started() == [] and listener.accepting and "a" not in handler.dropped


def test_a_resource_error_parks_the_client_and_a_session_end_tries_it_again(log) -> None:
    handler = FakeHandler()
    gate, listener = gate_with(handler, log, max_sessions=5)
    run_at_once(handler, "a", "b")
    gate.admit("a", None)
    settle()
    handler.start_says["b"] = errno.EMFILE
    gate.admit("b", None)
    settle()
    assert gate.short and not listener.accepting and handler.started() == ["a"]
    assert "b" not in handler.dropped  # kept: nobody is refused for want of fds
    handler.session_ends("a")
    settle()
    assert handler.started() == ["a", "b"] and not gate.short and listener.accepting


def test_a_spawner_that_reports_a_resource_error_parks_too(log) -> None:
    handler = FakeHandler()
    gate, listener = gate_with(handler, log, max_sessions=5)
    handler.spawned_says["a"] = errno.EAGAIN
    run_at_once(handler, "a", "b")
    gate.admit("a", None)
    settle()
    assert gate.short and gate.active == 0 and not listener.accepting
    gate.admit("b", None)  # accepted meanwhile (a race with the pause): it runs, and the parked one follows
    settle()
    assert handler.started() == ["b", "a"] and not gate.short


def test_a_session_that_ended_before_its_command_frees_its_slot(log) -> None:
    handler = FakeHandler()
    gate, listener = gate_with(handler, log, max_sessions=1)
    handler.spawned_says["a"] = ENDED
    run_at_once(handler, "a")
    gate.admit("a", None)
    settle()
    assert gate.active == 0 and handler.started() == [] and listener.accepting and not gate.short


def test_spawns_in_flight_hold_accept(log) -> None:
    handler = FakeHandler()
    gate, listener = gate_with(handler, log, max_sessions=100)
    for n in range(SPAWNS_IN_FLIGHT):
        gate.admit(f"c{n}", None)
    settle()
    assert gate.spawning == SPAWNS_IN_FLIGHT and not listener.accepting
    run_at_once(handler, "c0")
    settle()
    assert gate.spawning == SPAWNS_IN_FLIGHT - 1 and listener.accepting


def test_a_knock_waits_while_the_service_is_full_or_paused(log) -> None:
    handler = FakeHandler(has_prelude=True)
    gate, listener = gate_with(handler, log, max_sessions=1)
    run_at_once(handler, "a", "kept")
    gate.admit("a", None)
    handler.prelude_done("a")
    settle()
    gate.pause("memory")
    gate.knock("kept")
    settle()
    assert ("prelude", "kept") not in handler.steps and list(gate.knocking) == ["kept"]
    gate.resume("memory")
    settle()
    assert ("prelude", "kept") not in handler.steps  # still full: a's session holds the slot
    handler.session_ends("a")
    settle()
    assert ("prelude", "kept") in handler.steps and not gate.knocking


def test_close_ends_what_has_no_session_and_takes_no_more(log) -> None:
    handler = FakeHandler(has_prelude=True)
    gate, listener = gate_with(handler, log, max_sessions=1)
    gate.set_limits(1, 3)
    run_at_once(handler, "a")
    gate.admit("a", None)
    handler.prelude_done("a")
    gate.admit("queued", None)
    handler.prelude_done("queued")
    gate.admit("in-prelude", None)
    settle()
    gate.knock("kept")
    assert list(gate.ready) == ["queued"] and gate.pending == 1 and list(gate.knocking) == ["kept"]
    gate.close("shutdown")
    settle()
    assert handler.dropped == {"queued": "shutdown", "kept": "shutdown", "in-prelude": "shutdown"}
    gate.knock("late")
    assert handler.dropped["late"] == "shutdown"
    assert handler.started() == ["a"]  # the running session is the drain's, not the gate's


def test_start_gets_what_the_prelude_returned_not_what_arrived(log) -> None:
    """The prelude's result is a value of its own (the door's frozen Prelude in gsrv): the gate
    queues and starts what came back, and a None from it ends nothing of the gate's."""

    class Finding(FakeHandler):
        def prelude(self, conn: str) -> str | None:
            found = super().prelude(conn)
            return None if found is None else f"{found}+found"

    handler = Finding(has_prelude=True)
    gate, _ = gate_with(handler, log)
    run_at_once(handler, "a+found")
    handler.prelude_says["joined"] = False  # handed to a running session: not this gate's any more
    gate.admit("a", None)
    gate.admit("joined", None)
    handler.prelude_done("a")
    handler.prelude_done("joined")
    settle()
    assert ("start", "a+found") in handler.steps and ("start", "a") not in handler.steps
    assert handler.started() == ["a+found"] and "joined" not in handler.dropped and gate.pending == 0


@pytest.mark.parametrize(
    ("active", "paused", "pending", "held", "accepts"),
    [(2, set(), 0, 0, True), (2, set(), 0, 3, False), (2, set(), 4, 0, False), (0, {"memory"}, 0, 0, False)],
)  # fmt: skip
def test_the_decision_with_a_queue(active, paused, pending, held, accepts) -> None:
    # a full service (2 of 2) still accepts, up to queue_max (3) held beside max_pending (4) in their prelude
    assert may_accept(active, 2, paused, pending, 4, held, 3) is accepts


def test_held_connections_and_their_deadlines() -> None:
    held: Held[str] = Held()
    assert held.next_deadline(1.0) is None
    for conn, since in (("a", 10.0), ("b", 10.5), ("c", 11.0)):
        held.append(conn, since)
    assert held.next_deadline(1.0) == 11.0
    assert held.expired(11.6, 1.0) == ["a", "b"] and len(held) == 1 and held.next_deadline(1.0) == 12.0
    assert held.popleft() == "c" and len(held) == 0


def test_a_full_gate_with_a_queue_holds_then_answers_busy_and_a_pause_answers_at_once(log) -> None:
    handler = FakeHandler()
    gate, listener = gate_with(handler, log, max_sessions=1)
    gate.set_queue(0.05, 2, frozenset({"memory"}), frozenset())
    run_at_once(handler, "a")
    gate.admit("a", None)
    settle()
    assert handler.started() == ["a"] and listener.accepting  # full, and still accepting: it holds
    gate.admit("b", None)
    gate.admit("c", None)
    assert not listener.accepting  # queue_max held: the backlog again
    gevent.sleep(0.2)
    settle()
    assert [conn for step, conn in handler.steps if step == "busy"] == ["b", "c"]
    assert listener.accepting
    gate.set_queue(60.0, 2, frozenset({"memory"}), frozenset())
    gate.admit("d", None)
    gate.pause("memory")
    settle()
    assert [conn for step, conn in handler.steps if step == "busy"] == ["b", "c", "d"]  # at once
    assert not listener.accepting  # the memory guard's pause holds no more clients


def test_a_slow_prelude_with_a_slot_free_is_started_not_answered_busy(log) -> None:
    handler = FakeHandler(has_prelude=True)
    gate, _ = gate_with(handler, log, max_sessions=1)
    gate.set_queue(0.05, 4, frozenset({"memory"}), frozenset())
    run_at_once(handler, "slow")
    gate.admit("slow", None)
    gevent.sleep(0.1)  # its prelude took longer than queue_timeout
    handler.prelude_done("slow")
    settle()
    assert handler.started() == ["slow"] and ("busy", "slow") not in handler.steps


def test_a_queue_turned_off_or_shortened_by_a_reload(log) -> None:
    handler = FakeHandler()
    gate, _ = gate_with(handler, log, max_sessions=1)
    gate.set_queue(30.0, 4, frozenset(), frozenset())
    run_at_once(handler, "a")
    gate.admit("a", None)
    gate.admit("b", None)
    gate.set_queue(0.0, 4, frozenset(), frozenset())  # off: b waits for the slot, never answered busy
    gevent.sleep(0.1)
    settle()
    assert ("busy", "b") not in handler.steps and list(gate.ready) == ["b"]
    gate.set_queue(0.05, 4, frozenset(), frozenset())  # shorter: the timer follows at once
    gevent.sleep(0.2)
    settle()
    assert ("busy", "b") in handler.steps


def test_with_a_queue_a_kept_alive_request_is_let_in_and_held_in_turn(log) -> None:
    handler = FakeHandler(has_prelude=True)
    gate, _ = gate_with(handler, log, max_sessions=1)
    gate.set_queue(30.0, 4, frozenset(), frozenset())
    run_at_once(handler, "a", "kept", "new")
    gate.admit("a", None)
    handler.prelude_done("a")
    settle()
    gate.knock("kept")  # full: with a queue its head is read and it is held like a new one
    handler.prelude_done("kept")
    gate.admit("new", None)
    handler.prelude_done("new")
    settle()
    assert list(gate.knocking) == [] and list(gate.ready) == ["kept", "new"]
    handler.session_ends("a")
    settle()
    assert handler.started() == ["a", "kept"]


def test_held_clients_start_no_session_while_paused(log) -> None:
    handler = FakeHandler()
    gate, _ = gate_with(handler, log, max_sessions=1)
    gate.set_queue(30.0, 4, frozenset({"memory"}), frozenset())
    run_at_once(handler, "a", "b")
    gate.admit("a", None)
    gate.admit("b", None)
    gate.pause("drained_by_admin")
    handler.session_ends("a")
    settle()
    assert handler.started() == ["a"] and list(gate.ready) == ["b"]
    gate.resume("drained_by_admin")
    settle()
    assert handler.started() == ["a", "b"]
