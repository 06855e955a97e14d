"""The auth key's errors name the file, the line and what was expected, at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from gsrv.config.parse import parse
from gsrv.errors import ConfigError


def service(auth: str, transport: str = "http") -> str:
    return f'[services.x]\nlisten = "127.0.0.1:0"\ncommand = ["cat"]\ntransport = "{transport}"\nauth = {auth}\n'


def error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse("t.toml", text)
    return str(e.value)


def test_each_bad_auth_is_named(tmp_path: Path) -> None:
    users, tokens = tmp_path / "htpasswd", tmp_path / "tokens"
    users.write_text("alice:$apr1$abc$def\n")  # htpasswd -m: MD5, not taken
    tokens.write_text("short\n")
    assert f"{users} line 1: expected user:hash with a bcrypt hash" in error(service(f'{{ basic = "{users}" }}'))
    assert f"{tokens} line 1: a token must be 16 or more" in error(service(f'{{ bearer = "{tokens}" }}'))
    assert "cannot be read" in error(service(f'{{ basic = "{tmp_path}/none" }}'))
    assert "must be a table like" in error(service(f'{{ basic = "{users}", bearer = "{tokens}" }}'))
    assert "failures_per_minute must be an integer >= 1" in error(
        service(f'{{ bearer = "{tokens}", failures_per_minute = 0 }}')
    )
    tokens.write_text("a-token-long-enough-000\n")
    assert 'auth needs transport = "http" or "websocket"' in error(service(f'{{ bearer = "{tokens}" }}', "tcp"))
    config = parse("t.toml", service(f'{{ bearer = "{tokens}", realm = "inside" }}'))
    auth = config.services[0].interact.auth
    assert auth is not None and auth.tokens == ("a-token-long-enough-000",) and auth.realm == "inside"
