"""Every edge parser driven with arbitrary client bytes (hypothesis): it gives its result or
refuses with its own error, never another exception (a RecursionError, a TypeError from a
comparison, a ValueError from a decode once froze the server). The PROXY header and WebSocket
frames have theirs in test_proxy.py and test_wsframes.py, a chunked body in test_chunked.py."""

from __future__ import annotations

import base64
import time

import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsrv.config.auth import Credentials
from gsrv.config.http import HttpConfig
from gsrv.config.web import WebSocketConfig
from gsrv.edge.auth import Gatekeeper
from gsrv.edge.hello import Hello, parse_hello
from gsrv.edge.httphead import HeadError, Request, cgi_env, head_end, judge, parse, quoted
from gsrv.edge.upgrade import judge as judge_upgrade
from gsrv.edge.wsframes import ProtocolError

pytestmark = pytest.mark.timeout(120)

MANY = settings(max_examples=5 * settings.default.max_examples, deadline=None)
nested_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=3))  # fmt: skip


@MANY
@given(st.binary(max_size=300) | nested_json.map(lambda v: repr(v).encode()) | st.integers(0, 5000).map(
    lambda depth: b"[" * depth))  # fmt: skip
def test_a_hello_of_any_bytes_is_a_hello_or_a_protocol_error(body: bytes) -> None:
    try:
        assert isinstance(parse_hello(b"h" + body), Hello)
    except ProtocolError as e:
        assert e.code in (1008, 1009)


head_bytes = st.binary(max_size=200).map(lambda b: b"GET /" + b + b" HTTP/1.1\r\nHost: a\r\n\r\n") | st.builds(
    lambda line, fields: line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n",
    st.binary(max_size=60),
    st.lists(st.tuples(st.binary(min_size=1, max_size=12), st.binary(max_size=30)), max_size=5),
)  # fmt: skip


@MANY
@given(head_bytes)
def test_a_head_of_any_bytes_is_a_request_with_an_environment_or_an_answered_refusal(raw: bytes) -> None:
    try:
        end = head_end(raw)
        if not end:
            return
        request = parse(raw[:end])
        judge(request, HttpConfig())
    except HeadError as e:
        assert 400 <= e.status <= 505
        assert all(" " <= c <= "~" for c in str(e)), str(e)  # the answer's body quotes printable ASCII only
        return
    env = cgi_env(request, "/", ("127.0.0.1", 1))
    assert all("\0" not in k + v for k, v in env.items())
    for value in env.values():
        value.encode("utf-8", "surrogateescape")  # what the spawner's wire carries


@MANY
@given(st.text(max_size=80) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
def test_quoted_is_printable_ascii_at_most_64_characters_and_quotes(value: str) -> None:
    text = quoted(value)
    assert all(" " <= c <= "~" for c in text) and text.startswith('"') and text.endswith('"')
    assert len(text) <= 64 + 2 + 3


HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
BASIC = Credentials("basic", "/x", users=(("alice", HASH),), failures_per_minute=1_000_000)
BEARER = Credentials("bearer", "/x", tokens=("first-secret-token-0123",), failures_per_minute=1_000_000)
authorization = st.one_of(
    st.none(),
    st.text(max_size=60),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),  # a header's bytes as gsrv decodes them
    st.tuples(st.sampled_from(["Basic ", "Bearer ", "basic  "]), st.text(max_size=40)).map("".join),
    st.binary(max_size=40).map(lambda b: "Basic " + base64.b64encode(b).decode()),
)


@MANY
@given(authorization, st.sampled_from(["127.0.0.1", "2001:db8::1", "", None, "not an address"]))
def test_any_authorization_is_a_user_or_a_401_or_429(value: str | None, address: str | None) -> None:
    for credentials in (BASIC, BEARER):
        keeper = Gatekeeper()
        keeper.update(credentials)
        try:
            user = keeper.check(value, address, time.monotonic() + 10)
        except HeadError as e:
            assert e.status in (401, 429)
        else:
            assert user is not None


upgrade_value = st.binary(max_size=40).map(lambda b: b.decode("latin-1")) | st.sampled_from(
    ["websocket", "Upgrade", "13", "dGhlIHNhbXBsZSBub25jZQ==", "http://127.0.0.1", "127.0.0.1:80"])  # fmt: skip


UPGRADE_FIELDS = ("host", "upgrade", "connection", "sec-websocket-version", "sec-websocket-key", "origin",
                  "sec-websocket-protocol")  # fmt: skip


@MANY
@given(st.fixed_dictionaries({}, optional={name: upgrade_value for name in UPGRADE_FIELDS}),
       st.text(max_size=30).map(lambda t: "/" + t))  # fmt: skip
def test_an_upgrade_of_any_headers_is_judged_never_raises(fields: dict[str, str], path: str) -> None:
    request = Request("GET", path, "1.1", tuple(fields.items()), path, "")
    answer = judge_upgrade(request, WebSocketConfig(), False)
    assert answer.status in (101, 200, 400, 403, 404, 405)
    assert all(" " <= c <= "~" for c in answer.error), answer.error  # the refusal's body quotes printable ASCII
