"""The HTTP request head without a socket: where it ends, what gsrv refuses on the raw bytes,
the judgement against a service's http table, and the request as a CGI/1.1 environment."""

from __future__ import annotations

import pytest

from gsrv.config.http import HttpConfig
from gsrv.edge.httphead import MAX_HEAD, Gateway, HeadError, Request, cgi_env, head_end, judge, parse


def request(raw: bytes) -> Request:
    return parse(raw[: head_end(raw)])[0]


def refused(raw: bytes, cfg: HttpConfig | None = None) -> tuple[int, str]:
    with pytest.raises(HeadError) as e:
        judge(request(raw), cfg or HttpConfig())
    return e.value.status, e.value.reason


def test_a_head_ends_at_its_empty_line_and_not_before() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"
    assert head_end(raw) == len(raw) - 4
    assert head_end(raw[:20]) == 0
    assert head_end(b"GET / HTTP/1.1\r\nHost: a\r") == 0  # a CR that may be a CRLF's first half


@pytest.mark.parametrize("raw", [b"GET / HTTP/1.1\nHost: a\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
                                 b"GET / HTTP/1.1\r\nHost: a\n\n", b"GET / HTTP/1.1\r\r\n\r\n"])  # fmt: skip
def test_a_bare_cr_or_lf_in_the_head_is_smuggling(raw: bytes) -> None:
    with pytest.raises(HeadError) as e:
        head_end(raw)
    assert (e.value.status, e.value.reason) == (400, "smuggling")


def test_a_head_over_16_kib_is_431_complete_or_not() -> None:
    for raw in (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD, b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"):
        with pytest.raises(HeadError) as e:
            head_end(raw)
        assert e.value.status == 431


@pytest.mark.parametrize(("raw", "status", "reason"), [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\n", 400, "smuggling"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "smuggling"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\tmore\r\n\r\n", 400, "smuggling"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 501, "not_implemented"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 501, "not_implemented"),
    (b"GET /" + b"x" * 8200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "uri_too_long"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),  # HTTP/1.1 without Host (h11)
])  # fmt: skip
def test_the_raw_head_checks(raw: bytes, status: int, reason: str) -> None:
    with pytest.raises(HeadError) as e:
        parse(raw)
    assert (e.value.status, e.value.reason) == (status, reason)


def test_the_judgement() -> None:
    cfg = HttpConfig(path="/up", methods=("GET", "POST"), max_body=10, local_only=True)
    assert refused(b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\n", HttpConfig()) == (405, "method_not_allowed")
    assert refused(b"PUT /up HTTP/1.1\r\nHost: localhost\r\n\r\n", cfg) == (405, "method_not_allowed")
    assert refused(b"GET /upload HTTP/1.1\r\nHost: localhost\r\n\r\n", cfg) == (404, "not_found")
    assert refused(b"GET /up/%2E/x HTTP/1.1\r\nHost: localhost\r\n\r\n", cfg) == (400, "bad_request")
    assert refused(b"GET /up/a%00 HTTP/1.1\r\nHost: localhost\r\n\r\n", cfg) == (400, "bad_request")
    assert refused(b"GET /up HTTP/1.1\r\nHost: rebound.example\r\n\r\n", cfg) == (403, "host_denied")
    assert refused(b"POST /up HTTP/1.1\r\nHost: localhost\r\nContent-Length: 11\r\n\r\n", cfg) == (
        413,
        "body_too_large",
    )
    for fine in (b"GET /up HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n", b"GET /up/a/b?c HTTP/1.1\r\nHost: [::1]\r\n\r\n",
                 b"POST /up/ HTTP/1.1\r\nHost: x.localhost\r\nContent-Length: 10\r\n\r\n"):  # fmt: skip
        judge(request(fine), cfg)


def test_the_request_as_cgi_meta_variables() -> None:
    raw = (b"POST /app/a%20b/%C3%A9?q=1 HTTP/1.1\r\nHost: example.com:8080\r\nContent-Type: text/csv\r\n"
           b"Content-Length: 3\r\nX-Token: t\r\nX-Token: u\r\nX_Under: no\r\nProxy: http://evil\r\n"
           b"Authorization: Basic x\r\nConnection: keep-alive\r\nTE: trailers\r\n\r\n")  # fmt: skip
    env = cgi_env(request(raw), "/app/", ("10.0.0.1", 5555), Gateway(("127.0.0.1", 7008), secure=True))
    assert env == {
        "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_SOFTWARE": "gsrv",
        "SERVER_NAME": "example.com", "SERVER_PORT": "7008", "REQUEST_METHOD": "POST", "SCRIPT_NAME": "/app",
        "PATH_INFO": "/a b/é", "QUERY_STRING": "q=1", "REQUEST_URI": "/app/a%20b/%C3%A9?q=1",
        "CONTENT_LENGTH": "3", "CONTENT_TYPE": "text/csv", "REMOTE_ADDR": "10.0.0.1", "REMOTE_PORT": "5555",
        "HTTPS": "on", "HTTP_HOST": "example.com:8080", "HTTP_X_TOKEN": "t, u",
    }  # fmt: skip
    chunked = request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    env = cgi_env(chunked, "/", None, Gateway(None, secure=False))
    assert "CONTENT_LENGTH" not in env and env["SCRIPT_NAME"] == "" and env["PATH_INFO"] == "/"
    assert "HTTPS" not in env


def test_the_upgrade_as_the_websocket_transport_names_it() -> None:
    """The same builder without a gateway: the request's own names, only the fields named,
    PATH_INFO decoded with replacement (what the WebSocket transport has always given)."""
    raw = (b"GET /ws/%C3%A9/%FF?x=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: probe\r\nX-Token: t\r\nX-Token: u\r\n"
           b"Proxy: p\r\n\r\n")  # fmt: skip
    env = cgi_env(request(raw), "/ws", ("10.0.0.1", 5555), headers=("x-token", "proxy", "absent"))
    assert env == {
        "REQUEST_METHOD": "GET", "REQUEST_URI": "/ws/%C3%A9/%FF?x=1", "PATH_INFO": "/é/\ufffd", "QUERY_STRING": "x=1",
        "REMOTE_ADDR": "10.0.0.1", "REMOTE_PORT": "5555", "HTTP_X_TOKEN": "t, u", "HTTP_PROXY": "p",
    }  # fmt: skip


def test_what_a_request_says_of_its_connection() -> None:
    assert request(b"GET / HTTP/1.0\r\n\r\n").wants_close
    assert request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n").wants_close
    kept = request(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert not kept.wants_close and kept.expects_continue and kept.has_body and kept.content_length == 5
