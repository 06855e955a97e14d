"""Pure parts, without sockets or children: units, config, stderr lines, the gate's decision, log lines."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gsrv.accept.gate import may_accept
from gsrv.config.address import Address, parse_address
from gsrv.config.parse import parse
from gsrv.config.units import format_size, parse_duration, parse_size
from gsrv.errors import ConfigError
from gsrv.logs import format_line
from gsrv.relay.stderr import StderrLines

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("text", "size"),
    [(0, 0), (4096, 4096), ("64KiB", 65536), ("1MiB", 1 << 20), ("1.5GiB", 3 << 29), ("2KB", 2000), ("7B", 7)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["64", "64kib", "-1KiB", "KiB", True, 1.5, -3, "1 TiB", [64]])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="must be a size"):
        parse_size(bad)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_durations_scale_by_unit(n: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert parse_duration(f"{n}{unit}") == pytest.approx(n * factor)


@pytest.mark.parametrize("bad", [30, "30", "30 sec", "-1s", "1d", ""])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(bad)


def test_format_size() -> None:
    assert [format_size(n) for n in (17, 65536, 1.25 * 2**30)] == ["17B", "64KiB", "1.2GiB"]


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:7001", Address("127.0.0.1", 7001)),
        ("[::1]:0", Address("::1", 0)),
        ("0.0.0.0:1", Address("0.0.0.0", 1)),
        ("unix:/run/gsrv/echo.sock", Address(kind="unix", path="/run/gsrv/echo.sock")),
        ("fd:0", Address(kind="fd", fd=0)),
        ("systemd:echo", Address(kind="systemd", name="echo")),
    ],
)
def test_addresses(text: str, address: Address) -> None:
    assert parse_address(text) == address
    assert str(address) == text


@pytest.mark.parametrize(
    "bad",
    ["127.0.0.1", ":80", "::1:80", "[127.0.0.1]:80", "host:80", "1.2.3.4:65536", 80, "unix:rel", "fd:x", "systemd:"],
)
def test_bad_addresses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_address(bad)


def _services(*listens: str) -> str:
    return "".join(f'[services.s{i}]\nlisten = "{a}"\ncommand = ["cat"]\n' for i, a in enumerate(listens))


@pytest.mark.parametrize(
    "listens",
    [
        ("127.0.0.1:80", "127.0.0.1:80"),
        ("0.0.0.0:80", "127.0.0.2:80"),
        ("[::]:80", "127.0.0.1:80"),
        ("[::1]:9", "[::]:9"),
    ],
)
def test_colliding_addresses(listens: tuple[str, str]) -> None:
    with pytest.raises(ConfigError, match="collides with"):
        parse("t.toml", _services(*listens))


@pytest.mark.parametrize(
    "listens",
    [("127.0.0.1:0", "127.0.0.1:0"), ("127.0.0.1:80", "127.0.0.2:80"), ("0.0.0.0:80", "[::1]:80"), ("fd:0", "fd:3")],
)
def test_addresses_that_do_not_collide(listens: tuple[str, str]) -> None:
    assert len(parse("t.toml", _services(*listens)).services) == 2


def test_defaults_are_the_documented_ones() -> None:
    config = parse("t.toml", _services("127.0.0.1:0"))
    svc, server = config.services[0], config.server
    assert (server.log_level, server.log_format, server.drain_timeout, server.kill_grace, server.eof_grace) == (
        "info", "text", 30.0, 2.0, 1.0,
    )  # fmt: skip
    assert (svc.max_sessions, svc.chunk_size, svc.backlog, svc.idle_timeout, svc.session_timeout) == (
        256, 65536, 1024, 0.0, 0.0,
    )  # fmt: skip
    assert (svc.pass_env, svc.stderr, svc.nonzero_exit, svc.keepalive) == (
        ("PATH", "LANG", "LC_ALL", "TZ"), "log", "close", 60.0,
    )  # fmt: skip


def test_stderr_lines_split_cap_and_rate() -> None:
    lines = StderrLines(cap=10, rate=3)
    assert lines.feed(b"one\ntw", now=0.0) == ["one"]
    assert lines.feed(b"o\n" + b"x" * 25 + b"\nthree\n", now=0.0) == ["two", "x" * 10 + " [cut]"]
    assert lines.dropped == 1  # "three": the budget of 3 per second is spent
    assert lines.feed(b"four\nfive", now=1.0) == ["four"]
    assert lines.finish(now=1.0) == ["five"]


def test_gate_decision() -> None:
    assert may_accept(0, 1, set())
    assert not may_accept(1, 1, set())
    assert not may_accept(0, 5, {"draining"})


def test_log_line_formats() -> None:
    fields = {"service": "up", "line": 'say "hi" = x', "exit": 0, "signal": None}
    text = format_line("text", "info", "child_stderr", fields, 0.5)
    assert text == 'ts=1970-01-01T00:00:00.500Z level=info event=child_stderr service=up line="say \\"hi\\" = x" exit=0'
    record = json.loads(format_line("json", "info", "child_stderr", fields, 0.5))
    assert record == {"ts": "1970-01-01T00:00:00.500Z", "level": "info", "event": "child_stderr", "service": "up",
                      "line": 'say "hi" = x', "exit": 0}  # fmt: skip


def test_access_rules_and_per_address_bookkeeping() -> None:
    import ipaddress

    from gsrv.config.policy import Policy
    from gsrv.edge.access import Admission, allowed

    nets = lambda *items: tuple(ipaddress.ip_network(i) for i in items)  # noqa: E731
    assert allowed("10.1.2.3", (), ())
    assert not allowed("10.1.2.3", nets("10.0.0.0/8"), nets("10.1.0.0/16"))  # deny wins
    assert allowed("::ffff:10.9.9.9", nets("10.0.0.0/8"), ())  # an IPv4-mapped peer is judged as IPv4
    assert allowed(None, (), nets("10.0.0.0/8")) and not allowed(None, nets("10.0.0.0/8"), ())  # unix peers
    door = Admission(Policy(max_sessions_per_ip=2, rate_per_ip=1.0, rate_burst=3))
    A = "192.0.2.1"
    assert [door.check(A, A, 0.0) for _ in range(3)] == [None, None, "per_ip_limit"]
    door.release(A)
    assert door.check(A, A, 0.0) is None  # the third token of the burst
    door.release(A)
    assert door.check(A, A, 0.5) == "rate_limited"  # half a token refilled
    assert door.check(A, A, 1.0) is None  # one whole token
    door.release(A)
    door.release(A)
    assert door.live == {}  # nothing kept for an address without sessions
    for n in range(2000):  # a flood from many addresses, then quiet: the full buckets are swept
        ip = f"10.0.{n // 256}.{n % 256}"
        assert door.check(ip, ip, 100.0) is None
        door.release(ip)
    door.check("192.0.2.2", "192.0.2.2", 200.0)
    assert list(door.buckets) == ["192.0.2.2"]
