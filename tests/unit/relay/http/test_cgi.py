"""A CGI child's header block without a child: parsed, refused (502), and the head gsrv writes."""

from __future__ import annotations

import pytest

from gsrv.relay.http.cgi import BadHead, Head, block_end, failure_status, head_bytes, parse_block


def test_a_block_ends_at_an_empty_line_crlf_or_lf() -> None:
    assert block_end(b"Content-Type: a/b\r\n\r\nbody") == 21
    assert block_end(b"Content-Type: a/b\n\nbody") == 19
    assert block_end(b"Content-Type: a/b\r\nX: 1\n\r\nbody") == 26
    assert block_end(b"Content-Type: a/b\r\n") == 0


def test_status_fields_and_length() -> None:
    head = parse_block(b"Status: 404 Not Here\r\nContent-Type: text/plain\r\nX-A:  b \r\nContent-Length: 4\r\n\r\n")
    assert head == Head(
        404, "Not Here", ((b"Content-Type", b"text/plain"), (b"X-A", b"b"), (b"Content-Length", b"4")), 4
    )
    assert parse_block(b"Location: /there\n\n").status == 302
    assert parse_block(b"Status: 201\nContent-Type: a/b\n\n").reason == "Created"  # no text: the usual one
    assert parse_block(b"Status: 299\nContent-Type: a/b\n\n").reason == "Unknown"
    assert parse_block(b"Content-Type: a/b\nConnection: close\nTransfer-Encoding: gzip\n\n").fields == (
        (b"Content-Type", b"a/b"),
    )  # the framing is gsrv's


@pytest.mark.parametrize("block", [
    b"X-Only: 1\r\n\r\n",  # no Content-Type, Location or Status
    b"Status: 100 Continue\r\n\r\n", b"Status: 99\r\nContent-Type: a/b\r\n\r\n", b"Status: abc\r\n\r\n",
    b"Content-Type: a/b\r\nno colon here\r\n\r\n", b"Content Type: a/b\r\n\r\n",
    b"Content-Type: a/b\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"Content-Type: a/b\r\nContent-Length: -1\r\n\r\n",
])  # fmt: skip
def test_a_block_gsrv_cannot_answer_with_is_refused(block: bytes) -> None:
    with pytest.raises(BadHead):
        parse_block(block)


def test_the_head_gsrv_writes() -> None:
    head = Head(200, "OK", ((b"Content-Type", b"a/b"), (b"Content-Length", b"3")), 3)
    assert head_bytes("1.1", head, "length", close=False, trailer=False).startswith(
        b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nContent-Length: 3\r\nDate: "
    )
    chunked = head_bytes(
        "1.1", Head(200, "OK", ((b"Content-Type", b"a/b"),), None), "chunked", close=True, trailer=True
    )
    assert chunked.endswith(b"\r\nTransfer-Encoding: chunked\r\nTrailer: Gsrv-Exit\r\nConnection: close\r\n\r\n")


def test_the_status_for_a_session_that_ended_before_a_head() -> None:
    assert failure_status("child_exit", 3, None) == (502, "the command exited 3 before its response head",
                                                      (("Gsrv-Exit", "3"),))  # fmt: skip
    assert failure_status("child_exit", None, "KILL")[2] == (("Gsrv-Signal", "KILL"),)
    assert failure_status("session_timeout", None, "TERM")[0] == 504
    assert failure_status("shutdown", None, None)[0] == 503
    assert failure_status("internal_error", None, None)[0] == 500
