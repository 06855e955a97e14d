"""Access rules, per-IP limits and PROXY headers, from several source addresses on 127.0.0.0/8."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import Callable

import pytest
from conftest import Gsrv, service_toml, wait_until
from test_metrics import ADMIN, _admin, _samples, _value

SHOW_PEER = ["sh", "-c", 'echo "$TCPREMOTEIP:$TCPREMOTEPORT"; exec cat']


def connect_from(server: Gsrv, name: str, source: str, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(server.address(name), timeout=timeout, source_address=(source, 0))


def served(server: Gsrv, name: str, source: str) -> bool:
    """Whether a session from source runs its child (which names the client it saw)."""
    with connect_from(server, name, source) as sock:
        sock.shutdown(socket.SHUT_WR)
        try:
            reply = sock.recv(100)
        except ConnectionResetError:
            return False
    if not reply:
        return False
    assert reply.decode().startswith(f"{source}:"), reply
    return True


def test_allow_and_deny_act_per_source_address(gsrv: Callable[..., Gsrv]) -> None:
    server = gsrv(
        ADMIN
        + service_toml("open", SHOW_PEER, allow=["127.0.0.0/8"], deny=["127.0.0.3", "10.0.0.0/8"])
        + service_toml("only2", SHOW_PEER, allow=["127.0.0.2/32"])
    )
    assert served(server, "open", "127.0.0.1") and served(server, "open", "127.0.0.2")
    assert not served(server, "open", "127.0.0.3")  # deny wins over allow
    assert served(server, "only2", "127.0.0.2")
    assert not served(server, "only2", "127.0.0.1") and not served(server, "only2", "127.0.0.4")
    wait_until(lambda: server.count_log(r"reason=denied") == 3, 5, "three denied lines")
    assert server.count_log(r"service=open .*peer=127\.0\.0\.3:\d+ .*reason=denied") == 1
    samples = _samples(_admin(server))
    assert _value(samples, "gsrv_rejected_total", service="open", reason="denied") == 1
    assert _value(samples, "gsrv_rejected_total", service="only2", reason="denied") == 2
    assert not server.children()


def test_max_sessions_per_ip_caps_each_address_and_sends_the_banner(gsrv: Callable[..., Gsrv]) -> None:
    server = gsrv(service_toml("hold", SHOW_PEER, max_sessions_per_ip=2, reject_banner="busy, try later\n"))
    held = [connect_from(server, "hold", "127.0.0.2") for _ in range(2)]
    held += [connect_from(server, "hold", "127.0.0.3") for _ in range(2)]
    for sock in held:  # all four running: each child has named its client
        assert sock.recv(100).startswith(sock.getsockname()[0].encode())
    with connect_from(server, "hold", "127.0.0.2") as third:
        assert third.recv(100) == b"busy, try later\n"
        assert third.recv(100) == b""
    with connect_from(server, "hold", "127.0.0.3") as third:
        assert third.recv(100) == b"busy, try later\n"
    assert served(server, "hold", "127.0.0.4")  # another address is not affected
    held.pop(0).close()  # one of 127.0.0.2's sessions ends: it may have another
    wait_until(lambda: server.count_log(r"peer=127\.0\.0\.2:\d+ .*reason=(client_reset|eof)") == 1, 5, "its end")
    assert served(server, "hold", "127.0.0.2")
    assert server.count_log(r"reason=per_ip_limit") == 2
    for sock in held:
        sock.close()


def test_rate_per_ip_is_a_token_bucket_per_address(gsrv: Callable[..., Gsrv]) -> None:
    # 0.2 per second: after the burst of 3, a token every 5 s. How many of the two more tries
    # pass depends only on the time they took, so a slow machine cannot fail this.
    server = gsrv(service_toml("rate", SHOW_PEER, rate_per_ip=0.2, rate_burst=3))
    started = time.monotonic()
    first = [served(server, "rate", "127.0.0.2") for _ in range(5)]
    refilled = int((time.monotonic() - started) * 0.2)
    other = [served(server, "rate", "127.0.0.3") for _ in range(3)]
    assert first[:3] == [True, True, True] and sum(first[3:]) <= refilled, (first, refilled)
    assert other == [True, True, True]  # another address has its own bucket
    wait_until(lambda: served(server, "rate", "127.0.0.2"), 20, "a token 5 s later")
    assert server.count_log(r"peer=127\.0\.0\.2:\d+ .*reason=rate_limited") >= first.count(False)


def v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    addresses = (
        socket.inet_aton(source[0]) + socket.inet_aton(destination[0]) + struct.pack("!HH", source[1], destination[1])
    )
    tlv = bytes([0x04, 0, 3]) + b"abc"  # a NOOP TLV: skipped
    body = addresses + tlv
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def test_proxy_v2_from_a_trusted_peer_names_the_client_and_the_payload_is_exact(gsrv: Callable[..., Gsrv]) -> None:
    command = ["sh", "-c", 'echo "$TCPREMOTEIP:$TCPREMOTEPORT"; sha256sum']
    server = gsrv(service_toml("pp", command, proxy_protocol="v2", proxy_trusted=["127.0.0.2/32"]))
    payload = os.urandom(200_000)
    with connect_from(server, "pp", "127.0.0.2") as sock:
        sock.sendall(v2_header(("203.0.113.7", 4242), ("192.0.2.1", 443)) + payload)
        sock.shutdown(socket.SHUT_WR)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    who, digest = reply.decode().split("\n")[:2]
    assert who == "203.0.113.7:4242"
    assert digest.split()[0] == hashlib.sha256(payload).hexdigest()
    line = server.wait_log(r"event=session_end service=pp")
    assert "peer=203.0.113.7:4242 proxy=127.0.0.2:" in line and "bytes_in=200000" in line, line


def test_a_well_formed_header_from_an_untrusted_peer_is_refused_unread(gsrv: Callable[..., Gsrv]) -> None:
    server = gsrv(service_toml("pp", SHOW_PEER, proxy_protocol="v2", proxy_trusted=["127.0.0.2/32"]))
    with connect_from(server, "pp", "127.0.0.1") as sock:
        sock.sendall(v2_header(("203.0.113.7", 4242), ("192.0.2.1", 443)) + b"hello")
        with contextlib.suppress(ConnectionResetError):  # closed with the header unread: may be a reset
            assert sock.recv(100) == b""
    line = server.wait_log(r"reason=proxy_failed")
    assert "127.0.0.1 is not in proxy_trusted" in line or "not in proxy_trusted" in line, line
    assert not server.children()


def test_bad_or_late_proxy_headers_end_only_their_connection(gsrv: Callable[..., Gsrv]) -> None:
    server = gsrv(service_toml("pp", SHOW_PEER, proxy_protocol="v1", proxy_trusted=["127.0.0.0/8"], proxy_timeout="5s"))
    late = connect_from(server, "pp", "127.0.0.2")
    late.sendall(b"PROXY TCP4 198.51.100.1 ")  # and no more
    started = time.monotonic()
    with connect_from(server, "pp", "127.0.0.3") as bad:
        bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert bad.recv(100) == b""
    with connect_from(server, "pp", "127.0.0.4") as good:  # v1, header and payload in one send
        good.sendall(b"PROXY TCP4 198.51.100.9 192.0.2.1 5555 443\r\nping\n")
        good.shutdown(socket.SHUT_WR)
        assert b"".join(iter(lambda: good.recv(100), b"")) == b"198.51.100.9:5555\nping\n"
    late.setblocking(False)  # not held up by the late one: it is still waiting, unanswered
    with pytest.raises(BlockingIOError):
        late.recv(100)
    assert server.count_log(r"peer=127\.0\.0\.2:") == 0
    late.setblocking(True)
    late.settimeout(30)
    with contextlib.suppress(ConnectionResetError):
        assert late.recv(100) == b""
    assert time.monotonic() - started > 4  # its proxy_timeout (5 s, counted from an accept before `started`)
    late.close()
    server.wait_log(r"peer=127\.0\.0\.2:\d+ .*reason=proxy_failed error=\"no complete PROXY header within 5s")
    assert server.count_log(r"peer=127\.0\.0\.3:\d+ .*reason=proxy_failed error=.*must start with 'PROXY '") == 1


def test_access_on_proxy_judges_the_client_the_header_names(gsrv: Callable[..., Gsrv]) -> None:
    server = gsrv(
        service_toml(
            "pp",
            SHOW_PEER,
            proxy_protocol="v2",
            proxy_trusted=["127.0.0.2"],
            access_on="proxy",
            deny=["203.0.113.0/24"],
            max_sessions_per_ip=1,
        )  # fmt: skip
    )

    def attempt(client: str) -> bytes:
        with connect_from(server, "pp", "127.0.0.2") as sock:
            sock.sendall(v2_header((client, 1000), ("192.0.2.1", 443)))
            sock.shutdown(socket.SHUT_WR)
            return b"".join(iter(lambda: sock.recv(100), b""))

    assert attempt("198.51.100.1") == b"198.51.100.1:1000\n"
    assert attempt("203.0.113.5") == b""
    server.wait_log(r"peer=203\.0\.113\.5:1000 proxy=127\.0\.0\.2:\d+ .*reason=denied")
    # per-IP limits count the header's client, not the proxy: one held, another address still served
    held = connect_from(server, "pp", "127.0.0.2")
    held.sendall(v2_header(("198.51.100.1", 1001), ("192.0.2.1", 443)))
    assert held.recv(100) == b"198.51.100.1:1001\n"
    assert attempt("198.51.100.1") == b""
    assert attempt("198.51.100.2") == b"198.51.100.2:1000\n"
    held.close()
    server.wait_log(r"peer=198\.51\.100\.1:1000 .*reason=per_ip_limit")


def test_a_v1_header_dribbled_in_pieces_is_read_exactly_to_its_end(gsrv: Callable[..., Gsrv]) -> None:
    server = gsrv(service_toml("pp", ["sh", "-c", 'echo "$TCPREMOTEIP:$TCPREMOTEPORT"; exec wc -c'],
                               proxy_protocol="v1", proxy_trusted=["127.0.0.1"]))  # fmt: skip
    header = b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 443\r\n"
    with server.connect("pp") as sock:
        for piece in (header[:5], header[5:30], header[30:-1], header[-1:] + b"12345"):
            sock.sendall(piece)  # the last piece ends the header and starts the payload
            time.sleep(0.1)
        sock.sendall(b"67890")
        sock.shutdown(socket.SHUT_WR)
        assert b"".join(iter(lambda: sock.recv(100), b"")).split() == [b"2001:db8::1:65535", b"10"]
