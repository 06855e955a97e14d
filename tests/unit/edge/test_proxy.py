"""The PROXY protocol parser, sans I/O: exact headers, exact lengths, and for any other
input either "need more bytes" or its own error, never another exception or a byte of
payload. The headers are built here by hand, independently of the parser."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsrv.edge.proxy import ProxyError, ProxyHeader, parse, safe_read

pytestmark = pytest.mark.timeout(120)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
payload = st.binary(max_size=300)


def v1(family: str, src: str, dst: str, sport: int, dport: int) -> bytes:
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(command: int, family: int, block: bytes, transport: int = 1) -> bytes:
    return SIG + bytes([0x20 | command, family << 4 | transport]) + struct.pack("!H", len(block)) + block


def tlvs(items: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in items)


tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[str, bytes, ProxyHeader]:
    """(version, header bytes, what the parser must return)."""
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-unix", "v2-local"]))
    sport, dport = draw(ports), draw(ports)
    if kind in ("v1-4", "v1-6"):
        family = "TCP4" if kind == "v1-4" else "TCP6"
        src, dst = (draw(ipv4 if family == "TCP4" else ipv6) for _ in range(2))
        raw = v1(family, src, dst, sport, dport)
        return "v1", raw, ProxyHeader(1, False, family, (src, sport), (dst, dport), len(raw))
    if kind == "v1-unknown":
        raw = b"PROXY UNKNOWN" + draw(st.sampled_from([b"", b" 1.2.3.4 5.6.7.8 1 2", b" anything"])) + b"\r\n"
        return "v1", raw, ProxyHeader(1, True, "UNKNOWN", None, None, len(raw))
    extra = tlvs(draw(tlv_lists))
    if kind == "v2-4":
        src, dst = draw(ipv4), draw(ipv4)
        block = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)
        raw = v2(1, 1, block + extra)
        return "v2", raw, ProxyHeader(2, False, "TCP4", (src, sport), (dst, dport), len(raw))
    if kind == "v2-6":
        src, dst = draw(ipv6), draw(ipv6)
        block = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)
        raw = v2(1, 2, block + extra)
        return "v2", raw, ProxyHeader(2, False, "TCP6", (src, sport), (dst, dport), len(raw))
    if kind == "v2-unix":
        paths = [draw(st.text("abc/_.-", min_size=1, max_size=100)) for _ in range(2)]
        block = b"".join(p.encode().ljust(108, b"\0") for p in paths)
        raw = v2(1, 3, block + extra)
        return "v2", raw, ProxyHeader(2, False, "UNIX", paths[0], paths[1], len(raw))
    raw = v2(0, draw(st.integers(0, 3)), draw(st.binary(max_size=64)))  # LOCAL: the block is ignored
    return "v2", raw, ProxyHeader(2, True, "UNKNOWN", None, None, len(raw))


def outcome(data: bytes, version: str) -> ProxyHeader | None | str:
    """What parse says; any exception but ProxyError fails the test."""
    try:
        return parse(data, version)
    except ProxyError as e:
        return f"error: {e}"


@settings(max_examples=5 * settings.default.max_examples, deadline=None)
@given(st.sampled_from(["v1", "v2"]), st.binary(max_size=400))
def test_arbitrary_bytes_give_a_header_more_or_an_error(version: str, data: bytes) -> None:
    result = outcome(data, version)
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= len(data)
        assert parse(data[: result.length], version) == result  # it needed nothing past its end


@settings(max_examples=5 * settings.default.max_examples, deadline=None)
@given(valid_headers(), payload)
def test_valid_header_then_payload_is_exact(case: tuple[str, bytes, ProxyHeader], rest: bytes) -> None:
    version, raw, expected = case
    assert parse(raw + rest, version) == expected  # length == len(raw): no payload byte taken
    for cut in range(len(raw)):  # every truncation asks for more, never errs, never guesses
        assert parse(raw[:cut], version) is None, (raw[:cut], version)
        assert safe_read(raw[:cut], version) <= len(raw) - cut


@settings(max_examples=3 * settings.default.max_examples, deadline=None)
@given(valid_headers())
def test_the_other_version_is_refused(case: tuple[str, bytes, ProxyHeader]) -> None:
    version, raw, _ = case
    other = "v2" if version == "v1" else "v1"
    assert isinstance(outcome(raw, other), str)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "must start with 'PROXY '"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "without CRLF"),
        (b"PROXY TCP4 " + b"1" * 120, "without CRLF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "must be 'TCP4|TCP6"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "must be 'TCP4|TCP6"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "must be 'TCP4|TCP6"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad IPv4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "scoped"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad port"),
    ],
)
def test_bad_v1_headers_say_why(data: bytes, why: str) -> None:
    with pytest.raises(ProxyError, match=why.replace("|", r"\|")):
        parse(data, "v1")


def test_bad_v2_headers_say_why() -> None:
    address = bytes(12)
    cases = [
        (SIG[:11] + b"X" + bytes(4), "bad signature"),
        (SIG + bytes([0x11, 0x11]) + struct.pack("!H", 12) + address, "version 1"),
        (SIG + bytes([0x22, 0x11]) + struct.pack("!H", 12) + address, "unknown command 2"),
        (SIG + bytes([0x21, 0x41]) + struct.pack("!H", 12) + address, "unknown family"),
        (v2(1, 1, address, transport=2), "datagram"),
        (v2(1, 1, bytes(11)), "11 bytes, 12 needed"),
        (v2(1, 2, bytes(12)), "12 bytes, 36 needed"),
        (v2(1, 1, address + b"\x01\x00"), "ends inside a TLV"),
        (v2(1, 1, address + b"\x01\x00\x05abc"), "runs past the header"),
    ]
    for data, why in cases:
        with pytest.raises(ProxyError, match=why):
            parse(data, "v2")


def test_v2_unspecified_family_means_the_real_peer() -> None:
    raw = v2(1, 0, b"", transport=0)
    assert parse(raw + b"data", "v2") == ProxyHeader(2, True, "UNKNOWN", None, None, 16)


def test_safe_read_for_v2_stops_at_the_header_end() -> None:
    raw = v2(1, 1, bytes(12) + tlvs([(0x04, b"xyz")]))
    assert safe_read(b"", "v2") == 16
    assert safe_read(raw[:10], "v2") == 6
    assert safe_read(raw[:16], "v2") == len(raw) - 16
    assert safe_read(raw, "v2") == 0
    assert safe_read(b"PROXY", "v1") == 0  # v1 has no length: peek for the CRLF


@settings(max_examples=5 * settings.default.max_examples, deadline=None)
@given(valid_headers(), st.data())
def test_a_damaged_header_is_never_a_crash(case: tuple[str, bytes, ProxyHeader], data: st.DataObject) -> None:
    version, raw, _ = case
    at = data.draw(st.integers(0, len(raw) - 1))
    damaged = raw[:at] + bytes([data.draw(st.integers(0, 255))]) + raw[at + 1 :] + data.draw(payload)
    result = outcome(damaged, version)  # a header, None or ProxyError: nothing else
    if isinstance(result, ProxyHeader):
        assert result.length <= len(damaged)
