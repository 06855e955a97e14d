"""The server's state machine (gsrv/state.py) without a server: every transition it has, and
the ones it refuses."""

from __future__ import annotations

import os

import pytest

from gsrv.logs import Log
from gsrv.state import NEXT, BadTransition, Lifecycle, State


@pytest.fixture
def lifecycle(tmp_path):
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT)
    yield Lifecycle(Log(fd))
    os.close(fd)


def test_a_pressure_before_serving_starts_paused_and_relief_serves(lifecycle) -> None:
    lifecycle.pressure(True)
    assert lifecycle.state is State.STARTING and lifecycle.not_ready() == "accept paused by the memory guard"
    lifecycle.serve()
    assert lifecycle.state is State.PAUSED and lifecycle.accept_paused
    lifecycle.pressure(False)
    assert lifecycle.state is State.SERVING and not lifecycle.accept_paused and lifecycle.not_ready() is None


def test_a_drain_keeps_its_state_through_pressure_and_stops_once(lifecycle) -> None:
    lifecycle.serve()
    assert lifecycle.drain() and lifecycle.state is State.DRAINING
    assert not lifecycle.drain(), "a second drain begins nothing"
    lifecycle.pressure(True)
    lifecycle.pressure(False)
    assert lifecycle.state is State.DRAINING and lifecycle.accept_paused and lifecycle.not_ready() == "draining"
    lifecycle.stop()
    lifecycle.stop()
    assert lifecycle.state is State.STOPPED and lifecycle.stopped.is_set()


def test_transitions_it_does_not_have_are_refused(lifecycle) -> None:
    with pytest.raises(BadTransition, match="from starting to stopped"):
        lifecycle.stop()
    assert not lifecycle.drain(), "nothing to drain before serving"
    assert all(State.STARTING not in targets for targets in NEXT.values()), "nothing goes back to starting"


def test_an_announcement_fails_readiness_without_pausing_accept_and_ends_in_the_drain(lifecycle) -> None:
    lifecycle.serve()
    assert lifecycle.announce() and lifecycle.state is State.ANNOUNCING
    assert lifecycle.not_ready() == "draining" and not lifecycle.accept_paused
    assert not lifecycle.announce(), "a second announcement begins nothing"
    lifecycle.pressure(True)  # the guard still holds accept while announcing, and says so
    assert lifecycle.state is State.ANNOUNCING and lifecycle.accept_paused
    lifecycle.pressure(False)
    assert lifecycle.drain() and lifecycle.state is State.DRAINING and lifecycle.accept_paused
    assert not lifecycle.announce(), "no announcement once the drain began"
