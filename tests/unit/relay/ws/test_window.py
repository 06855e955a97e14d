"""The output window without a socket: opt-in, bounded, and open while the client's input waits."""

from __future__ import annotations

import gevent
import pytest

from gsrv.edge.wsframes import ProtocolError
from gsrv.relay.ws.window import Window


def test_no_window_until_the_first_acknowledgement() -> None:
    window = Window(1000)
    window.sent = 5000
    assert window.room(65536, lambda: False) == (65536, 0.0)
    window.ack(b"4500")
    assert window.room(65536, lambda: False) == (500, 0.0)


def test_a_full_window_waits_for_an_acknowledgement_unless_input_is_stuck() -> None:
    window = Window(1000)
    window.sent = 1000
    window.ack(b"0")
    assert window.room(4096, lambda: True)[0] == 4096  # acknowledgements may wait behind input
    gevent.get_hub().loop.update_now()  # a stale loop clock (a test before ran without the hub) fires a timer early
    later = gevent.spawn_later(0.2, window.ack, b"600")
    with gevent.Timeout(5):
        room, waited = window.room(4096, lambda: False)
    later.join()
    assert room == 600 and waited > 0.1  # it waited for the acknowledgement (its deadline: the Timeout)


@pytest.mark.parametrize("text", [b"", b"x1", b"12" * 11, b"1001"])
def test_an_acknowledgement_that_is_no_count_or_past_the_output_is_a_1008(text: bytes) -> None:
    window = Window(1000)
    window.sent = 1000
    with pytest.raises(ProtocolError) as e:
        window.ack(text)
    assert e.value.code == 1008


def test_with_reattach_the_window_keeps_the_bytes_it_counts_and_gives_them_from_an_offset() -> None:
    window = Window(10)
    window.keep()
    for data in (b"abcd", b"efgh", b"ij"):
        window.sending(data)
    assert b"".join(window.since(3)) == b"defghij"
    window.ack(b"5")
    assert window.base == 5 and b"".join(window.since(6)) == b"ghij"
    assert window.resume(7) == 7 and window.acked == 7  # a reconnected page that has 7 bytes
    assert window.resume(2) == 7  # one that has less than what is kept (a reload): from the oldest kept
    with pytest.raises(ProtocolError):
        window.resume(11)  # past what was sent


def test_what_is_kept_stays_within_the_window_even_when_it_could_not_hold() -> None:
    window = Window(10)
    window.keep()
    window.sending(b"0123456789")
    window.sending(b"abcdef")  # the window let it through (input stuck behind a child that does not read)
    assert window.base == 6 and b"".join(window.since(6)) == b"6789abcdef"
    assert window.resume(3) == 6
