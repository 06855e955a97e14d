"""Tasks in reused workers (gsrv/workers.py) on a real gevent loop: a worker runs one job after
another, a kill ends a job where it waits (or before it began) and each end is seen once, a
bug is reported and the worker goes on, and no more than `max_idle` workers wait."""

from __future__ import annotations

import gevent
import pytest
from gevent import get_hub
from gevent.event import Event
from greenlet import getcurrent  # type: ignore[import-untyped]

from gsrv.workers import DONE, Workers


def test_a_worker_that_finished_its_job_runs_the_next() -> None:
    workers = Workers(max_idle=4)
    ran: list[object] = []

    def job() -> str:
        ran.append(getcurrent())
        return "one"

    first = workers.start(job)
    gevent.sleep(0)
    assert first.dead and first.value == "one" and len(workers.idle) == 1
    second = workers.start(lambda: ran.append(getcurrent()))
    gevent.sleep(0)
    assert second.dead and ran[0] is ran[1], "the same greenlet ran the second job"


@pytest.mark.timeout(10)
def test_a_kill_ends_a_job_where_it_waits_and_returns_once_it_ended() -> None:
    workers = Workers(max_idle=4)
    steps: list[str] = []
    never = Event()

    def job() -> None:
        try:
            steps.append("waiting")
            never.wait()
            steps.append("woke")  # never reached
        finally:
            gevent.sleep(0.01)  # its cleanup may wait too: kill() waits for it
            steps.append("cleaned up")

    ended: list[str] = []
    task = workers.start(job, then=lambda t: ended.append(t.state))
    gevent.sleep(0)
    assert steps == ["waiting"]
    task.kill()
    assert steps == ["waiting", "cleaned up"] and task.dead and task.exception is None
    gevent.sleep(0)
    assert ended == [DONE], "its end is told once"
    task.kill()  # a second kill of an ended task: nothing
    assert len(workers.idle) == 1, "the worker went back to wait for a job"


def test_a_task_killed_before_it_began_never_runs_and_its_end_is_told() -> None:
    workers = Workers(max_idle=4)
    ran: list[int] = []
    ended: list[bool] = []
    task = workers.start(ran.append, 1, then=lambda t: ended.append(t.dead))
    task.kill(block=False)
    gevent.sleep(0)
    gevent.sleep(0)
    assert ran == [] and ended == [True]
    after = workers.start(ran.append, 2)
    gevent.sleep(0)
    assert after.dead and ran == [2], "the worker the killed task had is still good"


def test_a_bug_is_reported_and_kept_and_the_worker_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    workers = Workers(max_idle=4)

    def bug() -> None:
        raise ValueError("a bug in a job")

    task = workers.start(bug)
    gevent.sleep(0)
    assert isinstance(task.exception, ValueError) and task.dead
    assert "a bug in a job" in capsys.readouterr().err, "reported as gevent reports a greenlet's"
    again = workers.start(lambda: 7)
    gevent.sleep(0)
    assert again.value == 7 and len(workers.idle) == 1


def test_no_more_than_max_idle_workers_wait() -> None:
    workers = Workers(max_idle=3)
    release = Event()
    tasks = [workers.start(release.wait) for _ in range(8)]
    gevent.sleep(0)
    assert not workers.idle and not any(t.dead for t in tasks)
    release.set()
    gevent.sleep(0)
    gevent.sleep(0)
    assert all(t.dead for t in tasks) and len(workers.idle) == 3


def test_a_throw_at_a_waiting_worker_is_reported_and_it_still_serves(capsys: pytest.CaptureFixture[str]) -> None:
    workers = Workers(max_idle=4)
    workers.start(lambda: None)
    gevent.sleep(0)
    waiting = workers.idle[0]
    get_hub().loop.run_callback(waiting.throw, ValueError("a stray timer"))  # as a timer its job left would
    gevent.sleep(0)
    assert "a stray timer" in capsys.readouterr().err and not waiting.dead
    again = workers.start(lambda: 7)
    gevent.sleep(0)
    assert again.value == 7 and workers.idle == [waiting]
