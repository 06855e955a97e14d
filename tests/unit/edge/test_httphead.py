"""The HTTP request head without a socket: where it ends, what gsrv refuses on the raw bytes,
the judgement against a service's http table, and the request as a CGI/1.1 environment."""

from __future__ import annotations

import pytest

from gsrv.config.http import HttpConfig
from gsrv.edge.httphead import MAX_HEAD, Gateway, HeadError, Request, cgi_env, head_end, judge, parse, quoted


def request(raw: bytes) -> Request:
    return parse(raw[: head_end(raw)])


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
    PATH_INFO the bytes sent (surrogateescape), as for the HTTP transport."""
    raw = (b"GET /ws/%C3%A9/%FF?x=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: probe\r\nX-Token: t\r\nX-Token: u\r\n"
           b"Proxy: p\r\n\r\n")  # fmt: skip
    env = cgi_env(request(raw), "/ws", ("10.0.0.1", 5555), headers=("x-token", "proxy", "absent"))
    assert env == {
        "REQUEST_METHOD": "GET", "REQUEST_URI": "/ws/%C3%A9/%FF?x=1", "PATH_INFO": "/é/\udcff", "QUERY_STRING": "x=1",
        "REMOTE_ADDR": "10.0.0.1", "REMOTE_PORT": "5555", "HTTP_X_TOKEN": "t, u", "HTTP_PROXY": "p",
    }  # fmt: skip


def test_what_a_request_says_of_its_connection() -> None:
    assert request(b"GET / HTTP/1.0\r\n\r\n").wants_close
    assert request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n").wants_close
    kept = request(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert not kept.wants_close and kept.expects_continue and kept.has_body and kept.content_length == 5


@pytest.mark.parametrize("line", [b"GET / HTTP/9.9", b"GET / HTTP/2.0", b"GET / HTTP/3.0", b"PRI * HTTP/2.0",
                                  b"GET / HTTP/0.9"])  # fmt: skip
def test_a_major_version_other_than_1_is_505(line: bytes) -> None:
    with pytest.raises(HeadError) as e:
        parse(line + b"\r\nHost: a\r\n\r\n")
    assert (e.value.status, e.value.reason) == (505, "version_not_supported")


def test_a_higher_minor_version_of_1_is_served_as_1_1_and_1_0_stays_1_0() -> None:
    assert [request(b"GET / HTTP/1.%d\r\nHost: a\r\n\r\n" % n).version for n in range(10)] == ["1.0"] + ["1.1"] * 9


@pytest.mark.parametrize("raw", [b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x07b\r\n\r\n",
                                 b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
                                 b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x7fb\r\n\r\n",
                                 b"GET / HTTP/1.1\r\nHost: a\x1b\r\n\r\n",
                                 b"GET /a\x07b HTTP/1.1\r\nHost: a\r\n\r\n",
                                 b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n"])  # fmt: skip
def test_a_control_character_in_the_head_is_400(raw: bytes) -> None:
    with pytest.raises(HeadError) as e:
        parse(raw)
    assert (e.value.status, e.value.reason) == (400, "bad_request")
    assert "\\x" not in str(e.value) and "bytearray" not in str(e.value)


def test_a_horizontal_tab_in_a_field_value_is_fine() -> None:
    assert request(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\tb\r\n\r\n").header("x-a") == "a\tb"


@pytest.mark.parametrize("host", [b"evil.example@127.0.0.1:80", b"127.0.0.1/evil", b"127.0.0.1?x", b"127.0.0.1#x",
                                  b"a b", b"127.0.0.1:8o", b"[::1"])  # fmt: skip
def test_a_host_that_is_not_a_host_and_port_is_400(host: bytes) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    try:
        got = refused(raw)
    except HeadError as e:  # h11 refuses some itself
        got = (e.status, e.reason)
    assert got == (400, "bad_request")


def test_two_hosts_are_400() -> None:
    with pytest.raises(HeadError) as e:
        judge(Request("GET", "/", "1.1", (("host", "a"), ("host", "b")), "/", ""), HttpConfig())
    assert (e.value.status, e.value.reason) == (400, "bad_request")


def test_a_client_value_is_quoted_as_printable_ascii_cut_to_64() -> None:
    assert quoted("plain") == '"plain"'
    assert quoted(b"a\x00\xe9\\") == '"a\\x00\\xe9\\\\"'
    assert quoted("x" * 100) == '"' + "x" * 64 + '..."'
    assert quoted("x" * 63 + "\x01") == '"' + "x" * 63 + '..."'  # never half an escape
    assert all(" " <= c <= "~" for c in quoted(bytes(range(256))))


def test_an_http_1_x_request_without_host_is_400_as_1_1_is() -> None:
    for line in (b"GET / HTTP/1.1", b"GET / HTTP/1.2", b"GET / HTTP/1.9"):
        with pytest.raises(HeadError) as e:
            parse(line + b"\r\n\r\n")
        assert (e.value.status, e.value.reason) == (400, "bad_request")
    assert request(b"GET / HTTP/1.0\r\n\r\n").version == "1.0"  # HTTP/1.0 needs none
