"""The output window without a socket: opt-in, bounded, and open while the client's input waits."""

from __future__ import annotations

import gevent
import pytest

from gsrv.relay.window import Window
from gsrv.relay.wsframes import ProtocolError


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
    later = gevent.spawn_later(0.2, window.ack, b"600")
    with gevent.Timeout(5):
        room, waited = window.room(4096, lambda: False)
    later.join()
    assert room == 600 and 0.1 < waited < 2


@pytest.mark.parametrize("text", [b"", b"x1", b"12" * 11, b"1001"])
def test_an_acknowledgement_that_is_no_count_or_past_the_output_is_a_1008(text: bytes) -> None:
    window = Window(1000)
    window.sent = 1000
    with pytest.raises(ProtocolError) as e:
        window.ack(text)
    assert e.value.code == 1008
