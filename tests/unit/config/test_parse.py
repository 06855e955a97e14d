"""Listen addresses (config/address.py), their collisions, and the defaults a service gets (config/parse.py)."""

from __future__ import annotations

import pytest

from gsrv.config.address import Address, parse_address
from gsrv.config.parse import parse
from gsrv.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


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
