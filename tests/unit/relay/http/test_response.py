"""The HTTP response as an object (relay/http/response.py), without a socket: each framing's
writer on its own state (what it sent, the byte it holds, its failure: h11's test_io is the
model), and a Response choosing its framing once from the head and sending through a list."""

from __future__ import annotations

import pytest

from gsrv.relay.http.cgi import Head
from gsrv.relay.http.response import (
    Broken,
    ChunkedWriter,
    LengthWriter,
    NoBody,
    Passthrough,
    Response,
    UntilClose,
)

pytestmark = pytest.mark.timeout(30)


def wire(writer, *writes: bytes) -> bytes:
    return b"".join(bytes(writer.frame(data)) for data in writes)


def test_a_length_body_holds_its_last_byte_until_the_verdict() -> None:
    writer = LengthWriter(10)
    assert wire(writer, b"hello", b"world") == b"helloworl"
    assert writer.held == b"d" and writer.sent == 9 and writer.short() is None
    assert writer.last(0) == b"d"


def test_a_length_body_over_its_length_fails_on_its_own_state() -> None:
    writer = LengthWriter(4)
    assert wire(writer, b"ab") == b"ab"
    with pytest.raises(Broken):
        writer.frame(b"cde")
    assert writer.failure is not None and writer.failure.reason == "bad_gateway"
    assert "more than its Content-Length 4" in writer.failure.error


def test_a_byte_after_the_held_one_is_too_much_not_a_new_last_byte() -> None:
    writer = LengthWriter(3)
    assert wire(writer, b"abc") == b"ab" and writer.held == b"c"
    with pytest.raises(Broken):
        writer.frame(b"d")
    assert writer.held == b"c"


def test_a_length_body_that_ends_short_says_how_short() -> None:
    writer = LengthWriter(10)
    wire(writer, b"1234")
    failure = writer.short()
    assert failure is not None and failure.error == "the command wrote 4 of its Content-Length 10"
    assert writer.failure == failure


def test_content_length_0_is_complete_with_no_body() -> None:
    writer = LengthWriter(0)
    assert writer.short() is None
    with pytest.raises(Broken):
        writer.frame(b"x")


def test_chunks_and_the_last_chunk_with_the_exit_as_a_trailer() -> None:
    writer = ChunkedWriter(trailers=True)
    assert wire(writer, b"hello", b"x" * 26) == b"5\r\nhello\r\n1a\r\n" + b"x" * 26 + b"\r\n"
    assert writer.sent == 31 and writer.held == b""
    assert writer.last(3) == b"0\r\nGsrv-Exit: 3\r\n\r\n"
    assert ChunkedWriter(trailers=False).last(0) == b"0\r\n\r\n"


def test_until_close_and_no_body() -> None:
    close = UntilClose()
    assert wire(close, b"a", b"bc") == b"abc" and close.last(0) == b"" and not close.keeps
    none = NoBody()
    assert none.drops and wire(none, b"dropped") == b"" and none.sent == 0


def test_nph_reads_the_status_from_the_childs_first_bytes() -> None:
    writer = Passthrough(drops=False)
    assert wire(writer, b"HTTP/1.1 418 I'm a teapot\r\n\r\n") == b"HTTP/1.1 418 I'm a teapot\r\n\r\n"
    assert writer.status == 418 and not writer.keeps
    other = Passthrough(drops=False)
    wire(other, b"not a status line")
    assert other.status is None


class Sent(list[bytes]):
    def __call__(self, data: bytes | memoryview) -> float:
        self.append(bytes(data))
        return 0.0


def response(version: str = "1.1", method: str = "GET", close: bool = False) -> tuple[Response, Sent]:
    sent = Sent()
    return Response(sent, version, method, trailers=True, close_after=close), sent


@pytest.mark.parametrize(
    ("version", "method", "head", "framing", "keeps"),
    [("1.1", "GET", Head(200, "OK", ((b"Content-Length", b"3"),), 3), "length", True),
     ("1.1", "GET", Head(200, "OK", (), None), "chunked", True),
     ("1.0", "GET", Head(200, "OK", (), None), "close", False),
     ("1.1", "HEAD", Head(200, "OK", ((b"Content-Length", b"3"),), 3), "none", True),
     ("1.1", "GET", Head(304, "Not Modified", (), None), "none", True)],
)  # fmt: skip
def test_the_framing_is_chosen_once_with_the_head(version, method, head, framing, keeps) -> None:
    resp, _ = response(version, method)
    resp.begin(head)
    assert resp.writer is not None and resp.writer.framing == framing and resp.status == head.status
    assert resp.keeps is keeps and resp.began


def test_the_head_goes_with_the_first_body_bytes_in_one_send() -> None:
    resp, sent = response()
    resp.begin(Head(200, "OK", ((b"Content-Length", b"5"),), 5))
    assert sent == []
    resp.write(b"hello")
    assert len(sent) == 1 and sent[0].startswith(b"HTTP/1.1 200 OK\r\n") and sent[0].endswith(b"\r\n\r\nhell")
    resp.end(0)
    assert sent[-1] == b"o"


def test_a_response_complete_at_its_head_holds_the_heads_last_byte() -> None:
    resp, sent = response(method="HEAD")
    resp.begin(Head(200, "OK", ((b"Content-Length", b"3"),), 3))
    assert resp.dropping
    resp.flush()
    assert b"Content-Length: 3\r\n" in sent[0] and sent[0].endswith(b"GMT\r\n\r")  # the last \n held
    resp.end(0)
    assert sent[-1] == b"\n"


def test_http_1_0_without_a_length_closes_and_gsrvs_own_answer_closes() -> None:
    resp, _ = response(version="1.0")
    resp.begin(Head(200, "OK", (), None))
    assert resp.close_after and not resp.keeps
    mine, sent = response()
    mine.own(502, b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
    assert mine.status == 502 and mine.close_after and not mine.keeps and not mine.began and sent


def test_a_failure_is_the_writers_own() -> None:
    resp, _ = response()
    resp.begin(Head(200, "OK", ((b"Content-Length", b"2"),), 2))
    with pytest.raises(Broken):
        resp.write(b"abc")
    assert resp.failure is not None and resp.failure.reason == "bad_gateway"


def test_nph_begins_with_the_childs_first_bytes() -> None:
    resp, sent = response()
    resp.pass_through()
    assert not resp.began and resp.status is None
    resp.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert resp.began and resp.status == 204 and not resp.keeps and sent


def test_nph_that_wrote_nothing_gets_gsrvs_own_status_logged() -> None:
    resp, _ = response()
    resp.pass_through()
    resp.own(502, b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
    assert resp.status == 502 and not resp.began
