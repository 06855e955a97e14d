"""Where a service listens: "host:port", "[v6]:port", "unix:/path", "fd:N" or "systemd:NAME".

Pure: parsing, printing and which addresses collide; binding is the server's.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from gsrv.config.units import describe

EXPECTED = (
    'must be "host:port" or "[v6]:port" with an IP address and a port 0-65535, '
    '"unix:/path", "fd:N" (an inherited listening socket) or "systemd:NAME"'
)


# RFC 9112 §3.2, RFC 3986 §3.2: a Host header is a uri-host (an IP-literal, or reg-name's
# characters, IPv4 included) and an optional port; never userinfo ("@"), a path, a query or a fragment
HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|\[v[0-9A-Fa-f]+\.[\w.~!$&'()*+,;=:-]+\]|[\w.~!$&'()*+,;=%-]*)(:[0-9]*)?", re.A)


def valid_host(host: str) -> bool:
    """Whether an HTTP Host header's value is a host and an optional port."""
    return HOST.fullmatch(host) is not None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class Address:
    """kind "tcp": host and port (0: the kernel picks); "unix": path; "fd": fd;
    "systemd": name (a LISTEN_FDNAMES name, resolved when gsrv starts)."""

    host: str = ""
    port: int = 0
    kind: str = "tcp"
    path: str = ""
    fd: int = -1
    name: str = ""

    @property
    def is_v6(self) -> bool:
        return ":" in self.host

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")

    @property
    def inherited(self) -> bool:
        """gsrv did not bind it: on drain it only stops accepting, another process may serve it."""
        return self.kind in ("fd", "systemd")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd:{self.fd}"
        if self.kind == "systemd":
            return f"systemd:{self.name}"
        return host_port(self.host, self.port)


def host_port(host: str, port: int) -> str:
    """ "127.0.0.1:7001", or "[::1]:7001" for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: object) -> Address:
    """One of the forms in EXPECTED; ValueError naming them otherwise."""
    if isinstance(text, str):
        kind, _, rest = text.partition(":")
        if kind == "unix" and rest.startswith("/") and len(rest) > 1:
            return Address(kind="unix", path=os.path.normpath(rest))
        if kind == "fd" and rest.isdigit():
            return Address(kind="fd", fd=int(rest))
        if kind == "systemd" and rest and rest.replace("-", "").replace("_", "").replace(".", "").isalnum():
            return Address(kind="systemd", name=rest)
        tcp = _parse_tcp(text)
        if tcp is not None:
            return tcp
    raise ValueError(f"{EXPECTED} (got {describe(text)})")


def _parse_tcp(text: str) -> Address | None:
    host, sep, port = text.rpartition(":")
    want_v6 = host.startswith("[") and host.endswith("]")
    if want_v6:
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if sep and (ip.version == 6) == want_v6 and port.isdigit() and 0 <= int(port) <= 65535:
        return Address(str(ip), int(port))
    return None


def collide(a: Address, b: Address) -> bool:
    """Two TCP addresses on one port collide when their hosts are equal or one is a wildcard;
    others when they name the same path, fd or systemd name."""
    if a.kind != b.kind:
        return False
    if a.kind != "tcp":
        return (a.path, a.fd, a.name) == (b.path, b.fd, b.name)
    if a.port == 0 or a.port != b.port:
        return False
    same_family = a.is_v6 == b.is_v6
    return a.host == b.host or "::" in (a.host, b.host) or (same_family and (a.is_wildcard or b.is_wildcard))
