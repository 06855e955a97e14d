"""Config files of any shape (hypothesis): parse gives a Config or a ConfigError naming the
file, never another exception (a 2,000-deep array once killed gsrv's signal handling)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsrv.config.parse import Config, parse
from gsrv.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

KEYS = ["listen", "command", "max_sessions", "env", "rlimits", "cwd", "transport", "tls", "http", "websocket",
        "auth", "user", "pty", "relay", "stderr", "idle_timeout", "chunk_size", "allow", "deny", "proxy_protocol",
        "max_pending", "nofile", "fsize", "path", "methods", "basic", "bearer"]  # fmt: skip
scalar = st.one_of(st.integers(-(2**70), 2**70), st.booleans(), st.floats(allow_nan=False), st.text(max_size=20),
                   st.sampled_from(["127.0.0.1:0", "cat", "1MiB", "10s", "http", "websocket", "/", "\0"]))  # fmt: skip
value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=3), max_leaves=12)  # fmt: skip


def toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not isinstance(v, float) or v == v and abs(v) != float("inf") else "0"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml(i) for i in v) + "]"
    assert isinstance(v, dict)
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml(i)}" for k, i in v.items()) + " }"


@settings(max_examples=5 * settings.default.max_examples, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), value, max_size=6), st.integers(0, 3000))
def test_any_service_table_is_a_config_or_a_config_error(table: dict[str, object], depth: int) -> None:
    lines = [f"{json.dumps(k)} = {toml(v)}" for k, v in table.items()]
    text = "[services.up]\n" + "\n".join(lines) + "\n" + ("deep = " + "[" * depth + "]" * depth + "\n" if depth else "")
    try:
        config = parse("fuzz.toml", text)
    except ConfigError as e:
        assert str(e).startswith("fuzz.toml")
    else:
        assert isinstance(config, Config)
