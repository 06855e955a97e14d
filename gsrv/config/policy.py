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
from collections.abc import Callable
from dataclasses import dataclass, field

from gsrv.config import keys
from gsrv.config.keys import AT_ONCE, key
from gsrv.config.table import Table
from gsrv.config.units import describe, parse_duration, parse_size

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MIN_TLS = ssl.TLSVersion.TLSv1_2
BANNER_MAX = 1024  # sent with one non-blocking send: it must fit any socket buffer
RLIMIT_MAX = (1 << 63) - 1  # a limit above is "unlimited" to the kernel, or no number prlimit takes
# rlimits: key -> (prlimit option, how the value is written)
RLIMITS = {"nofile": ("nofile", "count"), "as": ("as", "size"), "cpu": ("cpu", "duration"),
           "fsize": ("fsize", "size"), "nproc": ("nproc", "count")}  # fmt: skip
HANDSHAKE_TIMEOUT = "10s"


def _networks(t: Table, key: str, default: object = ()) -> tuple[Network, ...]:
    items = t.strings(key, ())
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise t.fail(key, f'must list addresses or CIDR blocks like "10.0.0.0/8" (got "{item}")') from None
    return tuple(networks)


def _rate(t: Table, key: str, default: object) -> float:
    value = t.data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1e6:
        raise t.fail(
            "rate_per_ip", f"must be sessions per second as a number >= 0, like 5 or 0.5 (got {describe(value)})"
        )
    return float(value)


def _pem(t: Table, name: str, default: object) -> str | None:
    """A PEM file's path, readable now (a reload reads it again)."""
    value = t.data.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise t.fail(name, f"must be a PEM file's path (got {describe(value)})")
    _readable(t, name, value)
    return value


@dataclass(frozen=True)
class TlsConfig:
    """A service's `tls` table; `context` is made from its files at load (and at each reload)."""

    cert: str = keys.required(_pem, "the server's certificate (chain), a PEM file", "server.pem")
    key: str = keys.required(_pem, "its private key, a PEM file", "server.key")
    client_ca: str | None = keys.key(_pem, None, "CA certificates a client must present a certificate from (then "
                                     "required)", example="clients-ca.pem")  # fmt: skip
    handshake_timeout: float = keys.key(keys.duration(), HANDSHAKE_TIMEOUT, "the handshake must be done this long "
                                        "after accept; else tls_failed")  # fmt: skip
    context: ssl.SSLContext = field(kw_only=True, compare=False, repr=False)


def _tls(t: Table, name: str, default: object) -> TlsConfig | None:
    value = t.data.get(name, default)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise t.fail(
            "tls", f'must be a table like {{ cert = "server.pem", key = "server.key" }} (got {describe(value)})'
        )
    sub = Table(t.file, f"{t.name}.tls", value, keys.names(TlsConfig))
    values = keys.read_all(sub, TlsConfig)
    cert, private, client_ca = values["cert"], values["key"], values.get("client_ca")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_TLS
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(cert, private)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise sub.fail("key", f'"{private}" is not the private key of tls.cert "{cert}"') from None
        with open(cert, "rb") as f:
            bad = "key" if b"-----BEGIN CERTIFICATE-----" in f.read() else "cert"
        raise sub.fail(
            bad, f'"{values[bad]}" is not a PEM {"certificate" if bad == "cert" else "private key"} ({e})'
        ) from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as e:
            raise sub.fail("client_ca", f'"{client_ca}" holds no PEM CA certificate ({e})') from None
        context.verify_mode = ssl.CERT_REQUIRED
    return TlsConfig(**values, context=context)


def _show_tls(tls: TlsConfig | None) -> str:
    if tls is None:
        return "none"
    ca = f" client_ca={tls.client_ca}" if tls.client_ca else ""
    return f"{tls.cert}{ca} handshake_timeout={tls.handshake_timeout:g}s"


def _readable(t: Table, key: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise t.fail(key, f'"{path}" cannot be read: {e.strerror or e}') from None


def _identity(lookup: Callable[[str], object]) -> keys.Read:
    """A user or group name that exists here, for a gsrv that runs as root."""

    def read(t: Table, key: str, default: object) -> str:
        value = t.data.get(key, default)
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
        return value

    return read


def _rlimits(t: Table, name: str, default: object) -> tuple[tuple[str, int], ...]:
    value = t.data.get(name, default)
    if not isinstance(value, dict):
        raise t.fail("rlimits", f'must be a table like {{ nofile = 1024, fsize = "1GiB" }} (got {describe(value)})')
    sub = Table(t.file, f"{t.name}.rlimits", value, tuple(RLIMITS))
    limits = []
    for name, item in value.items():
        kind = RLIMITS[name][1]
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
            raise sub.fail(name, str(e)) from None
        most, whose = (_nr_open(), "this host's fs.nr_open") if name == "nofile" else (RLIMIT_MAX, "a limit's largest")
        if amount > most:
            raise sub.fail(name, f"must be at most {most} ({whose}) (got {describe(item)})")
        limits.append((name, amount))
    return tuple(limits)


def _nr_open() -> int:
    """The most open files a process may be allowed here (setrlimit refuses more)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


def _banner(t: Table, key: str, default: object) -> str:
    banner = t.data.get(key, default)
    if not isinstance(banner, str) or len(banner.encode()) > BANNER_MAX:
        raise t.fail(key, f"must be a string of at most {BANNER_MAX} bytes (got {describe(banner)})")
    return banner


def _prefixes(
    t: Table, user: str, group: str, rlimits: tuple[tuple[str, int], ...], environ: dict[str, str]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The spawn stages these keys need (config/launch.py composes them in its order):
    prlimit (run as root, so hard limits can be set), setpriv (drops to user/group)."""
    stages = []
    if rlimits:
        limits = [f"--{RLIMITS[name][0]}={amount}:{amount}" for name, amount in rlimits]
        stages.append(("rlimits", (util_linux(t, "rlimits", "prlimit", environ), *limits, "--")))
    if user or group:
        if user:
            entry = pwd.getpwnam(user)
            gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
            ids = [f"--reuid={entry.pw_uid}", f"--regid={gid}", "--init-groups"]
        else:
            ids = [f"--regid={grp.getgrnam(group).gr_gid}", "--clear-groups"]
        stages.append(("privileges", (util_linux(t, "user" if user else "group", "setpriv", environ), *ids, "--")))
    return tuple(stages)


def util_linux(t: Table, key: str, name: str, environ: dict[str, str]) -> str:
    found = shutil.which(name, path=environ.get("PATH", os.defpath) + ":/usr/bin:/bin:/usr/sbin:/sbin")
    if found is None:
        raise t.fail(key, f"needs util-linux's {name}, which is not installed (Debian: apt-get install util-linux)")
    return os.path.abspath(found)


@dataclass(frozen=True)
class Policy:
    """The edge and privilege keys of one service (keys of its [services.NAME] table)."""

    tls: TlsConfig | None = key(_tls, None, "TLS termination (TLS 1.2 at least); files read again on SIGHUP",
                                reload="the files are read again: new handshakes use them", value=None,
                                example={"cert": "server.pem", "key": "server.key", "client_ca": "clients-ca.pem",
                                         "handshake_timeout": "10s"}, show=_show_tls)  # fmt: skip
    proxy_protocol: str = key(keys.choice("off", "v1", "v2"), "off", "each connection opens with a PROXY header")
    proxy_trusted: tuple[Network, ...] = key(_networks, [], "the only peers that may send a PROXY header",
                                             example=["10.0.0.5/32"])  # fmt: skip
    proxy_timeout: float = key(keys.duration(), "5s", "the PROXY header must be complete by then")
    max_pending: int = key(keys.integer(1), 128, "connections in their TLS handshake or PROXY header",
                           reload=AT_ONCE)  # fmt: skip
    allow: tuple[Network, ...] = key(_networks, [], "addresses or CIDR blocks allowed; [] = everyone not denied")
    deny: tuple[Network, ...] = key(_networks, [], "addresses or CIDR blocks refused; deny wins over allow")
    access_on: str = key(keys.choice("peer", "proxy"), "peer", 'allow/deny judge "peer" or "proxy" (the header\'s)')
    max_sessions_per_ip: int = key(keys.integer(0), 0, "sessions per client address; 0 = no limit")
    rate_per_ip: float = key(_rate, 0, "new sessions per second per client address; 0 = no limit",
                             show=lambda rate: f"{rate:g}/s")  # fmt: skip
    rate_burst: int = key(keys.integer(1), None, "the token bucket's size (default: rate_per_ip, >= 1)",
                          example=5, value=0)  # fmt: skip
    reject_banner: str = key(_banner, "", "text sent before closing a connection over a per-IP limit")
    queue_timeout: float = key(keys.duration("off"), "0s", "at max_sessions: gsrv holds a client this long from its "
                               "accept, then gives the busy answer; \"0s\": it waits in the backlog, unanswered",
                               reload="applies to clients accepted after it", shown=True)  # fmt: skip
    queue_max: int = key(keys.integer(1), 128, "with queue_timeout: clients held for a slot after their prelude "
                         "(beside max_pending); more wait in the backlog", reload=AT_ONCE, example=64)  # fmt: skip
    busy_on_pause: bool = key(keys.flag(), False, "with queue_timeout: while an operator's pause lasts, clients get "
                              "the busy answer at once instead of waiting in the backlog", reload=AT_ONCE,
                              example=True)  # fmt: skip
    busy_banner: str = key(_banner, "", "with queue_timeout, transport tcp: text sent before the busy close (over "
                           "TLS too)", example="busy, try again later\n",
                           reload="applies to busy answers given after it")  # fmt: skip
    user: str = key(_identity(pwd.getpwnam), "", "run the child as this user (gsrv must run as root)",
                    example="nobody")  # fmt: skip
    group: str = key(_identity(grp.getgrnam), "", "... and/or this group", example="nogroup")
    umask: int = key(keys.bits("0027"), None, "the child's umask (default: gsrv's own)", example="0027", value=-1,
                     show=lambda bits: f"{bits:04o}")  # fmt: skip
    rlimits: tuple[tuple[str, int], ...] = key(_rlimits, {}, "the child's limits (soft = hard), applied by prlimit")
    stages: tuple[tuple[str, tuple[str, ...]], ...] = ()  # derived: spawn stages for user, group, rlimits


def parse_policy(t: Table, environ: dict[str, str]) -> Policy:
    """The policy keys of a service's table, read and then checked against each other."""
    data = t.data
    if data.get("reject_banner") and "tls" in data:  # before the certificates are read
        raise t.fail(
            "reject_banner", "cannot be combined with tls: the banner would reach the client before the handshake"
        )
    values = keys.read_all(t, Policy)
    if values["proxy_protocol"] != "off" and not values["proxy_trusted"]:
        raise t.fail("proxy_trusted", 'is required with proxy_protocol: the proxies\' addresses, like ["10.0.0.5/32"]')
    if values["access_on"] == "proxy" and values["proxy_protocol"] == "off":
        raise t.fail("access_on", 'is "proxy" but proxy_protocol is "off": there is no PROXY header to read')
    for name in ("queue_max", "busy_on_pause", "busy_banner"):
        if name in data and not values["queue_timeout"]:
            raise t.fail(name, 'applies only with queue_timeout (how long a client is held, like "5s")')
    rate = values["rate_per_ip"]
    if "rate_burst" in data and not rate:
        raise t.fail("rate_burst", "applies only with rate_per_ip (sessions per second per address)")
    values["rate_burst"] = values.get("rate_burst", max(1, math.ceil(rate))) if rate else 0
    stages = _prefixes(t, values["user"], values["group"], values["rlimits"], environ)
    return Policy(**values, stages=stages)
