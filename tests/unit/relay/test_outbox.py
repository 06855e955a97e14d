"""A client's bounded queue of a shared output (relay/outbox.py), on a real gevent loop with a
fake connection: order, the bound, eviction's signal, the close with its last item, a send that
never returns, a send that fails."""

from __future__ import annotations

import gevent
import pytest
from gevent.event import Event

from gsrv.relay.outbox import Outbox

pytestmark = pytest.mark.timeout(30)


class Client:
    """Sends land in `got`; while `held` is clear, a send waits (a client that stopped reading)."""

    def __init__(self, reading: bool = True) -> None:
        self.got: list[bytes] = []
        self.held = Event()
        if reading:
            self.held.set()
        self.failures = 0

    def send(self, item: bytes) -> None:
        self.held.wait()
        if item == b"boom":
            raise ConnectionResetError("gone")
        self.got.append(item)

    def failed(self) -> None:
        self.failures += 1


def test_items_go_out_whole_and_in_order_first_ones_first() -> None:
    client = Client()
    box = Outbox(client.send, 100, client.failed, [b"answer", b"kept"])
    assert box.offer(b"live-1") and box.offer(b"live-2")
    gevent.sleep(0.01)
    assert client.got == [b"answer", b"kept", b"live-1", b"live-2"] and box.queued == 0
    assert box.close(b"", drop=False, linger=1.0)


def test_an_offer_over_the_bound_is_refused_and_a_control_item_is_not() -> None:
    client = Client(reading=False)
    box = Outbox(client.send, 10, client.failed)
    assert box.offer(b"12345") and box.offer(b"67890")
    gevent.sleep(0.01)  # the sender took the first and waits in its send
    assert box.queued == 5
    assert box.offer(b"abcde") and box.queued == 10
    assert not box.offer(b"x")  # fell behind: the owner evicts
    box.put(b"pong")  # the client's own exchange goes anyway
    assert box.queued == 14
    client.held.set()
    gevent.sleep(0.01)
    assert client.got == [b"12345", b"67890", b"abcde", b"pong"]
    assert box.close(b"", drop=False, linger=1.0)


def test_close_drops_what_waits_and_sends_its_last_item() -> None:
    client = Client(reading=False)
    box = Outbox(client.send, 100, client.failed, [b"a", b"b", b"c"])
    gevent.sleep(0.01)
    gevent.spawn_later(0.05, client.held.set)
    assert box.close(b"close", drop=True, linger=2.0)
    assert client.got == [b"a", b"close"]  # "a" was in flight; "b" and "c" dropped


def test_a_client_that_never_reads_costs_the_close_its_linger_and_no_more() -> None:
    client = Client(reading=False)
    box = Outbox(client.send, 100, client.failed, [b"stuck"])
    gevent.sleep(0.01)
    assert not box.close(b"close", drop=False, linger=0.05)
    gevent.sleep(0.01)
    assert box.sender.dead and client.got == []


def test_a_send_that_fails_tells_the_owner_once() -> None:
    client = Client()
    box = Outbox(client.send, 100, client.failed, [b"ok", b"boom", b"never"])
    gevent.sleep(0.01)
    assert client.got == [b"ok"] and client.failures == 1 and box.sender.dead
