"""A service's edge and privilege keys: TLS, PROXY protocol, access rules, per-IP limits,
the child's user, group, umask and rlimits. Parsed and checked at load, like the rest.

The child's privileges are applied by util-linux tools put in front of the command as an
argv prefix (`prlimit ... -- setpriv ... -- command`): no shell, and gsrv keeps spawning
with vfork (Popen's own user/group arguments would make it fork, ~2 ms of blocked loop).
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import pwd
import shutil
import ssl
from dataclasses import dataclass, field
from typing import Any

from gsrv.config.table import Table
from gsrv.config.units import describe, parse_duration, parse_size

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MIN_TLS = ssl.TLSVersion.TLSv1_2
BANNER_MAX = 1024  # sent with one non-blocking send: it must fit any socket buffer
# rlimits: key -> (prlimit option, how the value is written)
RLIMITS = {"nofile": ("nofile", "count"), "as": ("as", "size"), "cpu": ("cpu", "duration"),
           "fsize": ("fsize", "size"), "nproc": ("nproc", "count")}  # fmt: skip
TLS_KEYS = ("cert", "key", "client_ca", "handshake_timeout")


@dataclass(frozen=True)
class TlsConfig:
    cert: str
    key: str
    client_ca: str | None
    handshake_timeout: float
    context: ssl.SSLContext = field(compare=False, repr=False)  # built at load: a reload reloads the files


@dataclass(frozen=True)
class Policy:
    """The edge and privilege keys of one service, as ServiceConfig fields."""

    tls: TlsConfig | None = None
    proxy_protocol: str = "off"  # "v1", "v2" or "off"
    proxy_trusted: tuple[Network, ...] = ()
    proxy_timeout: float = 5.0
    max_pending: int = 128  # TLS handshakes and PROXY headers in progress
    allow: tuple[Network, ...] = ()  # empty: everyone not denied
    deny: tuple[Network, ...] = ()
    access_on: str = "peer"  # or "proxy": the address the PROXY header reports
    max_sessions_per_ip: int = 0  # 0: no limit
    rate_per_ip: float = 0.0  # sessions per second per address; 0: no limit
    rate_burst: int = 0
    reject_banner: str = ""
    user: str = ""
    group: str = ""
    umask: int = -1  # -1: gsrv's own
    rlimits: tuple[tuple[str, int], ...] = ()
    launcher: tuple[str, ...] = ()  # derived: the argv prefix that applies user, group and rlimits


KEYS = tuple(k for k in Policy.__dataclass_fields__ if k != "launcher")


def parse_policy(t: Table, data: dict[str, Any], environ: dict[str, str]) -> Policy:
    proxy_protocol = t.choice("proxy_protocol", "off", ("off", "v1", "v2"))
    proxy_trusted = _networks(t, "proxy_trusted")
    if proxy_protocol != "off" and not proxy_trusted:
        raise t.fail("proxy_trusted", 'is required with proxy_protocol: the proxies\' addresses, like ["10.0.0.5/32"]')
    access_on = t.choice("access_on", "peer", ("peer", "proxy"))
    if access_on == "proxy" and proxy_protocol == "off":
        raise t.fail("access_on", 'is "proxy" but proxy_protocol is "off": there is no PROXY header to read')
    rate = _rate(t)
    burst = t.integer("rate_burst", max(1, math.ceil(rate)), 1)
    if "rate_burst" in data and not rate:
        raise t.fail("rate_burst", "applies only with rate_per_ip (sessions per second per address)")
    banner = data.get("reject_banner", "")
    if not isinstance(banner, str) or len(banner.encode()) > BANNER_MAX:
        raise t.fail("reject_banner", f"must be a string of at most {BANNER_MAX} bytes (got {describe(banner)})")
    if banner and "tls" in data:
        raise t.fail("reject_banner", "cannot be sent on a TLS service: it would reach the client before the handshake")
    user, group = _identity(t, data)
    rlimits = _rlimits(t, data.get("rlimits", {}))
    return Policy(
        tls=_tls(t, data.get("tls")),
        proxy_protocol=proxy_protocol,
        proxy_trusted=proxy_trusted,
        proxy_timeout=t.duration("proxy_timeout", "5s"),
        max_pending=t.integer("max_pending", 128, 1),
        allow=_networks(t, "allow"),
        deny=_networks(t, "deny"),
        access_on=access_on,
        max_sessions_per_ip=t.integer("max_sessions_per_ip", 0, 0),
        rate_per_ip=rate,
        rate_burst=burst if rate else 0,
        reject_banner=banner,
        user=user,
        group=group,
        umask=_umask(t, data),
        rlimits=rlimits,
        launcher=_launcher(t, user, group, rlimits, environ),
    )


def _networks(t: Table, key: str) -> tuple[Network, ...]:
    items = t.strings(key, ())
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise t.fail(key, f'must list addresses or CIDR blocks like "10.0.0.0/8" (got "{item}")') from None
    return tuple(networks)


def _rate(t: Table) -> float:
    value = t.data.get("rate_per_ip", 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1e6:
        raise t.fail(
            "rate_per_ip", f"must be sessions per second as a number >= 0, like 5 or 0.5 (got {describe(value)})"
        )
    return float(value)


def _tls(t: Table, value: object) -> TlsConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise t.fail(
            "tls", f'must be a table like {{ cert = "server.pem", key = "server.key" }} (got {describe(value)})'
        )
    sub = Table(t.file, f"{t.name}.tls", value, TLS_KEYS)
    for required in ("cert", "key"):
        if not isinstance(value.get(required), str) or not value[required]:
            raise sub.fail(required, f"is required: a PEM file's path (got {describe(value.get(required))})")
    client_ca = value.get("client_ca")
    if client_ca is not None and (not isinstance(client_ca, str) or not client_ca):
        raise sub.fail("client_ca", f"must be a PEM file's path (got {describe(client_ca)})")
    for key in ("cert", "key", "client_ca"):
        if value.get(key):
            _readable(sub, key, value[key])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_TLS
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(value["cert"], value["key"])
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise sub.fail("key", f'"{value["key"]}" is not the private key of tls.cert "{value["cert"]}"') from None
        with open(value["cert"], "rb") as f:
            bad = "key" if b"-----BEGIN CERTIFICATE-----" in f.read() else "cert"
        raise sub.fail(
            bad, f'"{value[bad]}" is not a PEM {"certificate" if bad == "cert" else "private key"} ({e})'
        ) from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as e:
            raise sub.fail("client_ca", f'"{client_ca}" holds no PEM CA certificate ({e})') from None
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return TlsConfig(value["cert"], value["key"], client_ca, sub.duration("handshake_timeout", "10s"), context)


def _readable(t: Table, key: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise t.fail(key, f'"{path}" cannot be read: {e.strerror or e}') from None


def _identity(t: Table, data: dict[str, Any]) -> tuple[str, str]:
    user, group = data.get("user", ""), data.get("group", "")
    for key, value, lookup in (("user", user, pwd.getpwnam), ("group", group, grp.getgrnam)):
        if not isinstance(value, str):
            raise t.fail(key, f'must be a name like "nobody" (got {describe(value)})')
        if value:
            try:
                lookup(value)
            except KeyError:
                raise t.fail(key, f'"{value}" does not exist on this machine') from None
            if os.geteuid() != 0:
                raise t.fail(
                    key, f"needs gsrv to run as root to switch the child to it (gsrv runs as uid {os.geteuid()})"
                )
    return user, group


def _umask(t: Table, data: dict[str, Any]) -> int:
    if "umask" not in data:
        return -1
    value = data["umask"]
    if isinstance(value, str) and value.isdigit() and all(c in "01234567" for c in value) and int(value, 8) <= 0o777:
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise t.fail("umask", f'must be permission bits like "0027" (got {describe(value)})')


def _rlimits(t: Table, value: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict):
        raise t.fail("rlimits", f'must be a table like {{ nofile = 1024, fsize = "1GiB" }} (got {describe(value)})')
    sub = Table(t.file, f"{t.name}.rlimits", value, tuple(RLIMITS))
    limits = []
    for key, item in value.items():
        kind = RLIMITS[key][1]
        try:
            if kind == "count":
                if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                    raise ValueError(f"must be an integer >= 1 (got {describe(item)})")
                amount = item
            elif kind == "size":
                amount = parse_size(item)
            else:
                seconds = parse_duration(item)
                if seconds < 1 or seconds != int(seconds):
                    raise ValueError(f'must be whole seconds, at least "1s" (got {describe(item)})')
                amount = int(seconds)
        except ValueError as e:
            raise sub.fail(key, str(e)) from None
        limits.append((key, amount))
    return tuple(limits)


def _launcher(
    t: Table, user: str, group: str, rlimits: tuple[tuple[str, int], ...], environ: dict[str, str]
) -> tuple[str, ...]:
    """prlimit (as root, so hard limits can be set) then setpriv (drops to user/group)."""
    argv: list[str] = []
    if rlimits:
        argv += [_tool(t, "rlimits", "prlimit", environ)]
        argv += [f"--{RLIMITS[name][0]}={amount}:{amount}" for name, amount in rlimits]
        argv += ["--"]
    if user or group:
        argv += [_tool(t, "user" if user else "group", "setpriv", environ)]
        if user:
            entry = pwd.getpwnam(user)
            gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
            argv += [f"--reuid={entry.pw_uid}", f"--regid={gid}", "--init-groups"]
        else:
            argv += [f"--regid={grp.getgrnam(group).gr_gid}", "--clear-groups"]
        argv += ["--"]
    return tuple(argv)


def _tool(t: Table, key: str, name: str, environ: dict[str, str]) -> str:
    found = shutil.which(name, path=environ.get("PATH", os.defpath) + ":/usr/bin:/bin:/usr/sbin:/sbin")
    if found is None:
        raise t.fail(key, f"needs util-linux's {name}, which is not installed (Debian: apt-get install util-linux)")
    return os.path.abspath(found)
