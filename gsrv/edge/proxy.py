"""PROXY protocol headers (v1 text, v2 binary), parsed without I/O.

A load balancer such as HAProxy (`send-proxy`, `send-proxy-v2`) prefixes each connection
with a header naming the original client. The parser is strict: the spec forbids guessing,
so anything that is not exactly a header of the configured version is an error, and the
connection must be closed. `parse(data, version)` returns the header and the number of
bytes it took, None while the bytes so far could still become a header, or raises
ProxyError. It never takes a byte past the header: those belong to the child.

`safe_read(data, version)` tells the I/O side how many more bytes it may read without
passing the header's end (v1 has no length field: 0 means peek and look for CRLF).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from gsrv.errors import GsrvError

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 header, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
V2_ADDRESS_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX
UNIX_PATH = 108


class ProxyError(GsrvError):
    """Not a valid PROXY header of the expected version."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    local: bool  # v2 LOCAL (a health check from the proxy itself) or v1 UNKNOWN: no client address
    family: str  # "TCP4", "TCP6", "UNIX" or "UNKNOWN"
    source: tuple[str, int] | str | None  # (ip, port), a unix path, or None
    destination: tuple[str, int] | str | None
    length: int  # bytes the header took


def parse(data: bytes, version: str) -> ProxyHeader | None:
    """The header at the start of data (version "v1" or "v2"), or None if more bytes are
    needed. Raises ProxyError for anything else."""
    if version == "v1":
        return _parse_v1(data)
    if version == "v2":
        return _parse_v2(data)
    raise ValueError(f"unknown PROXY protocol version {version!r}")


def safe_read(data: bytes, version: str) -> int:
    """How many more bytes may be read without passing the header's end: for v2 from its
    length field; for v1 0 (peek instead: the header ends at its CRLF)."""
    if version == "v1":
        return 0
    if len(data) < V2_FIXED:
        return V2_FIXED - len(data)
    size: int = struct.unpack_from("!H", data, 14)[0]
    return V2_FIXED + size - len(data)


# -- v1: "PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n" -------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | None:
    start = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(start):
        raise ProxyError("not a PROXY v1 header (it must start with 'PROXY ')")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX] or b"\r" in data[: min(len(data), V1_MAX) - 1]:
            raise ProxyError(f"PROXY v1 header without CRLF in its first {V1_MAX} bytes")
        return None
    line = data[len(V1_PREFIX) : end]
    length = end + 2
    fields = line.split(b" ")
    if fields[0] == b"UNKNOWN":  # the spec: whatever follows up to CRLF is ignored
        return ProxyHeader(1, True, "UNKNOWN", None, None, length)
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyError("PROXY v1 header must be 'TCP4|TCP6 SRC DST SPORT DPORT' or 'UNKNOWN'")
    family = fields[0].decode()
    want = ipaddress.IPv4Address if family == "TCP4" else ipaddress.IPv6Address
    src, dst = (_v1_address(f, want) for f in fields[1:3])
    sport, dport = (_v1_port(f) for f in fields[3:5])
    return ProxyHeader(1, False, family, (src, sport), (dst, dport), length)


def _v1_address(field: bytes, want: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]) -> str:
    if b"%" in field:  # an IPv6 scope has no meaning across a proxy
        raise ProxyError("PROXY v1 header has a scoped IPv6 address")
    try:
        return str(want(field.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(f"PROXY v1 header has a bad {want.__name__[:4]} address") from None


def _v1_port(field: bytes) -> int:
    if not field.isdigit() or (len(field) > 1 and field[:1] == b"0") or int(field) > 65535:
        raise ProxyError("PROXY v1 header has a bad port (0-65535, no leading zeros)")
    return int(field)


# -- v2: 12-byte signature, version/command, family/transport, length, addresses, TLVs ----


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
        raise ProxyError("not a PROXY v2 header (bad signature)")
    if len(data) < V2_FIXED:
        return None
    version_command, family_transport, size = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyError(f"PROXY v2 header with version {version_command >> 4}")
    command = version_command & 0xF
    if command not in (0x0, 0x1):
        raise ProxyError(f"PROXY v2 header with unknown command {command}")
    family, transport = family_transport >> 4, family_transport & 0xF
    if family > 0x3 or transport > 0x2:
        raise ProxyError(f"PROXY v2 header with unknown family/transport 0x{family_transport:02x}")
    length = V2_FIXED + size
    if len(data) < length:
        return None
    block = data[V2_FIXED:length]
    if command == 0x0 or family == 0x0:  # LOCAL, or PROXY with no address: use the real peer
        return ProxyHeader(2, True, "UNKNOWN", None, None, length)
    if transport != 0x1:
        raise ProxyError("PROXY v2 header for a datagram or unspecified transport (gsrv serves streams)")
    need = V2_ADDRESS_SIZES[family]
    if size < need:
        raise ProxyError(f"PROXY v2 address block of {size} bytes, {need} needed")
    _check_tlvs(block[need:])
    if family == 0x1:
        src4, dst4, sport, dport = struct.unpack_from("!4s4sHH", block)
        source, dest = (str(ipaddress.IPv4Address(a)) for a in (src4, dst4))
        return ProxyHeader(2, False, "TCP4", (source, sport), (dest, dport), length)
    if family == 0x2:
        src6, dst6, sport, dport = struct.unpack_from("!16s16sHH", block)
        source, dest = (str(ipaddress.IPv6Address(a)) for a in (src6, dst6))
        return ProxyHeader(2, False, "TCP6", (source, sport), (dest, dport), length)
    src_path, dst_path = (_unix_path(block[i : i + UNIX_PATH]) for i in (0, UNIX_PATH))
    return ProxyHeader(2, False, "UNIX", src_path, dst_path, length)


def _check_tlvs(rest: bytes) -> None:
    """TLVs are skipped, but each must fit: a length past the block is an error."""
    offset = 0
    while offset < len(rest):
        if len(rest) - offset < 3:
            raise ProxyError("PROXY v2 header ends inside a TLV")
        size = struct.unpack_from("!H", rest, offset + 1)[0]
        offset += 3 + size
        if offset > len(rest):
            raise ProxyError("PROXY v2 TLV runs past the header")


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
