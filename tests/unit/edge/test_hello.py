"""The terminal page's hello (edge/hello.py) without a socket: what parses, what is a 1008."""

from __future__ import annotations

import pytest

from gsrv.edge.hello import CLOSE_CODES, Hello, answer, parse_hello
from gsrv.edge.wsframes import ProtocolError


@pytest.mark.parametrize(
    ("message", "hello"),
    [
        (b"h", Hello()),
        (b"h{}", Hello()),
        (b'h{"bearer": "t0k"}', Hello(bearer="t0k")),
        (b'h{"resume": "abc", "offset": 12345}', Hello(resume="abc", offset=12345)),
        (b'h{"unknown": 1}', Hello()),  # later pages may say more
    ],
)
def test_hellos_that_parse(message: bytes, hello: Hello) -> None:
    assert parse_hello(message) == hello


@pytest.mark.parametrize(
    "message",
    [b"i{}", b"r80x24", b"h[]", b"h{", b'h{"offset": -1}', b'h{"offset": true}', b'h{"offset": "1"}',
     b'h{"resume": 5}', b'h{"bearer": ["x"]}', b"h\xff"],
)  # fmt: skip
def test_anything_else_first_is_a_1008(message: bytes) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_hello(message)
    assert e.value.code == 1008


def test_gsrvs_own_close_codes_are_in_its_range_and_the_answer_is_a_binary_h_message() -> None:
    assert all(4000 <= code <= 4999 for code in CLOSE_CODES.values())
    frame = answer({"offset": 0})
    assert frame[0] == 0x82 and frame[2:] == b'h{"offset":0}'
