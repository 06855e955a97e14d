"""A walk over many items in slices (periodic.in_slices) on a real gevent loop: other greenlets
(the relays) run between its slices, and a loop kept busy by them (an fd always ready, as a
relay's socket is) still leaves it its share."""

from __future__ import annotations

import os
import time

import gevent
from gevent.socket import wait_read

from gsrv.periodic import SLICE_S, in_slices

ITEM_S = 0.0001  # each item's work: a tenth of a millisecond of CPU


def work(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def test_other_greenlets_run_between_the_slices_of_a_walk() -> None:
    turns = [0]

    def relay() -> None:
        while True:
            turns[0] += 1
            gevent.sleep(0.0002)  # a relay waiting on its sockets now and then

    other = gevent.spawn(relay)
    gevent.sleep(0)
    try:
        before = turns[0]
        for _ in in_slices(range(400)):  # 40 ms of work: at least 80 slices
            work(ITEM_S)
        assert turns[0] - before >= 20, turns[0] - before  # a walk without slices: none at all
    finally:
        other.kill()


def test_a_loop_kept_busy_still_leaves_the_walk_its_share() -> None:
    readable, writable = os.pipe()
    os.write(writable, b"x" * 65536)

    def busy() -> None:  # a relay whose socket is always ready: the loop is never idle
        while True:
            wait_read(readable)
            work(SLICE_S)
            os.read(readable, 1)

    other = gevent.spawn(busy)
    gevent.sleep(0)
    try:
        walked = 0
        with gevent.Timeout(30):  # a starved walk never ends (the busy relay always has more to do)
            for _ in in_slices(range(200)):  # 20 ms of work
                work(ITEM_S)
                walked += 1
        assert walked == 200  # its share (0.2 s here) is a speed: bench/sessions_listing.py keeps the figure
    finally:
        other.kill()
        os.close(readable)
        os.close(writable)
