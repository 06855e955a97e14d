"""The TOML config file: parsed with tomllib into frozen dataclasses, every value checked.

Each error names the file, the table and key, what was expected and what was found.
"""

from __future__ import annotations

import difflib
import os
import shutil
import tomllib
from dataclasses import dataclass
from typing import Any

import psutil

from gsrv.config.address import Address, collide, parse_address
from gsrv.config.policy import KEYS, Policy, parse_policy
from gsrv.config.table import Table
from gsrv.config.units import Amount, describe, format_size
from gsrv.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_PASS_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
TOP_TABLES = ("server", "guard", "admin", "services")


@dataclass(frozen=True)
class ServerConfig:
    log_level: str = "info"
    log_format: str = "text"
    drain_timeout: float = 30.0
    kill_grace: float = 2.0
    eof_grace: float = 1.0


@dataclass(frozen=True)
class GuardConfig:
    """Memory guard thresholds: pressure starts at either limit, ends after resume_samples
    consecutive samples below both resume values."""

    interval: float = 1.0
    max_rss: int = 1024**3
    min_available: Amount = Amount(percent=5.0)
    resume_rss: int = int(0.9 * 1024**3)
    resume_available: Amount = Amount(percent=7.5)
    resume_samples: int = 3


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    listen: Address
    command: tuple[str, ...]
    max_sessions: int = 256
    chunk_size: int = 64 * 1024
    backlog: int = 1024
    idle_timeout: float = 0.0
    session_timeout: float = 0.0
    env: tuple[tuple[str, str], ...] = ()
    pass_env: tuple[str, ...] = DEFAULT_PASS_ENV
    cwd: str | None = None
    stderr: str = "log"
    nonzero_exit: str = "close"
    keepalive: float = 60.0
    mode: int = 0o660
    relay: str = "auto"  # "splice" (Linux: no userland copy), "copy", or "auto": splice where there is one
    pipe_size: int = 0  # the child's stdin/stdout pipe capacity; 0: the kernel's default (64 KiB)
    executable: str = ""  # derived, not a key: command[0] found on the child's PATH at load time
    policy: Policy = Policy()  # TLS, PROXY protocol, access, per-IP limits, the child's privileges


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    services: tuple[ServiceConfig, ...]
    guard: GuardConfig = GuardConfig()
    overrides: tuple[str, ...] = ()  # --set items, applied again on every reload
    admin: Address | None = None  # /metrics, /healthz, /readyz; None: no admin endpoint


SERVER_KEYS = tuple(ServerConfig.__dataclass_fields__)
GUARD_KEYS = tuple(GuardConfig.__dataclass_fields__)
SERVICE_KEYS = tuple(k for k in ServiceConfig.__dataclass_fields__ if k not in ("name", "executable", "policy")) + KEYS


def _resolve_command(table: Table, command: tuple[str, ...], env: dict[str, str], cwd: str | None) -> str:
    """The program's absolute path (found once here, so no spawn searches PATH again)."""
    program = command[0]
    if "/" in program:
        path = os.path.join(cwd or os.getcwd(), program)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise table.fail("command[0]", f'"{program}" is not an executable file')
        return os.path.abspath(path)
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        raise table.fail("command[0]", f'"{program}" was not found on PATH ({env.get("PATH", os.defpath)})')
    return os.path.abspath(os.path.join(cwd or os.getcwd(), found))


def _service(file: str, name: str, data: object, server_env: dict[str, str]) -> ServiceConfig:
    if not isinstance(data, dict):
        raise ConfigError(file, f"[services.{name}]", f"must be a table (got {describe(data)})")
    t = Table(file, f"services.{name}", data, SERVICE_KEYS)
    for required, example in (("listen", '"127.0.0.1:7001"'), ("command", '["sha256sum"]')):
        if required not in data:
            raise t.fail(required, f"is required (for example {required} = {example})")
    try:
        listen = parse_address(data["listen"])
    except ValueError as e:
        raise t.fail("listen", str(e)) from None
    command = t.strings("command", (), non_empty=True)
    env = t.string_table("env")
    pass_env = t.strings("pass_env", DEFAULT_PASS_ENV)
    cwd = data.get("cwd")
    if cwd is not None and not (isinstance(cwd, str) and os.path.isdir(cwd)):
        raise t.fail("cwd", f"must be an existing directory (got {describe(cwd)})")
    child_env = {k: server_env[k] for k in pass_env if k in server_env} | dict(env)
    executable = _resolve_command(t, command, child_env, cwd)
    return ServiceConfig(
        name=name,
        listen=listen,
        command=command,
        max_sessions=t.integer("max_sessions", 256, 1),
        chunk_size=t.size("chunk_size", 64 * 1024, 4 * 1024, 1024 * 1024),
        backlog=t.integer("backlog", 1024, 1),
        idle_timeout=t.duration("idle_timeout", "0s", zero_means="no limit"),
        session_timeout=t.duration("session_timeout", "0s", zero_means="no limit"),
        env=env,
        pass_env=pass_env,
        cwd=cwd,
        stderr=t.choice("stderr", "log", ("log", "discard", "stdout")),
        nonzero_exit=t.choice("nonzero_exit", "close", ("close", "reset")),
        keepalive=t.duration("keepalive", "60s", zero_means="off"),
        mode=_mode(t, data, listen),
        relay=_relay(t),
        pipe_size=_pipe_size(t),
        executable=executable,
        policy=_policy(t, data, server_env, listen),
    )


def _policy(t: Table, data: dict[str, Any], server_env: dict[str, str], listen: Address) -> Policy:
    policy = parse_policy(t, data, server_env)
    if listen.kind == "unix" and policy.proxy_protocol != "off":
        raise t.fail("proxy_protocol", "needs a TCP listener: a unix socket's peer has no address to trust")
    return policy


def _relay(t: Table) -> str:
    relay = t.choice("relay", "auto", ("auto", "splice", "copy"))
    if relay == "splice" and not hasattr(os, "splice"):
        raise t.fail("relay", 'is "splice" but this platform has no splice(2): use "auto" or "copy"')
    return relay


def _pipe_size(t: Table) -> int:
    """0 (the kernel's default) or a capacity up to the kernel's pipe-max-size."""
    size = t.size("pipe_size", 0, 0, 2**62)
    if size == 0:
        return 0
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = 1024 * 1024
    if not 4096 <= size <= ceiling:
        span = f"between 4KiB and {format_size(ceiling)} (fs.pipe-max-size)"
        raise t.fail("pipe_size", f"must be 0 (the kernel's default) or {span} (got {describe(t.data['pipe_size'])})")
    return size


def _mode(t: Table, data: dict[str, Any], listen: Address) -> int:
    """A unix socket file's permissions: "0660" or 0o660."""
    if "mode" not in data:
        return 0o660
    value = data["mode"]
    if listen.kind != "unix":
        raise t.fail("mode", f'applies only to listen = "unix:/path" (this service listens on {listen})')
    if isinstance(value, str) and value.isdigit() and all(c in "01234567" for c in value) and int(value, 8) <= 0o777:
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise t.fail("mode", f'must be permission bits like "0660" (got {describe(value)})')


def _guard(file: str, data: object) -> GuardConfig:
    if not isinstance(data, dict):
        raise ConfigError(file, "[guard]", f"must be a table (got {describe(data)})")
    t = Table(file, "guard", data, GUARD_KEYS)
    interval = t.duration("interval", "1s")
    if not 0.05 <= interval <= 60:
        raise t.fail("interval", f"must be between 50ms and 60s (got {describe(data['interval'])})")
    max_rss = t.size("max_rss", 1024**3, 1024**2, 2**50)
    min_available = t.amount("min_available", Amount(percent=5.0))
    resume_rss = t.size("resume_rss", int(max_rss * 0.9), 0, 2**50)
    if resume_rss > max_rss:
        got = describe(data["resume_rss"])
        raise t.fail("resume_rss", f"must not be above max_rss {format_size(max_rss)} (got {got})")
    resume_available = t.amount("resume_available", min_available.scaled(1.5))
    total = int(psutil.virtual_memory().total)  # compares a size with a percentage
    if resume_available.of(total) < min_available.of(total):
        got = describe(data["resume_available"])
        raise t.fail("resume_available", f"must not be below min_available {min_available} (got {got})")
    return GuardConfig(
        interval=interval,
        max_rss=max_rss,
        min_available=min_available,
        resume_rss=resume_rss,
        resume_available=resume_available,
        resume_samples=t.integer("resume_samples", 3, 1),
    )


def _check_addresses(file: str, services: list[ServiceConfig]) -> None:
    for i, svc in enumerate(services):
        for other in services[:i]:
            if collide(svc.listen, other.listen):
                where = f"[services.{svc.name}] listen"
                raise ConfigError(file, where, f"{svc.listen} collides with {other.listen} of [services.{other.name}]")


def apply_overrides(file: str, data: dict[str, Any], overrides: tuple[str, ...]) -> None:
    """`--set table.key=value` (value in TOML syntax, or a bare string) into the parsed file."""
    for item in overrides:
        path, eq, raw = item.partition("=")
        keys = path.strip().split(".")
        if not eq or len(keys) < 2 or not all(keys):
            raise ConfigError(
                "--set", item, "must be TABLE.KEY=VALUE, like guard.max_rss=1MiB or services.echo.max_sessions=8"
            )
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: a string
        table = data
        for key in keys[:-1]:
            nested = table.setdefault(key, {})
            if not isinstance(nested, dict):
                raise ConfigError(file, f"[{'.'.join(keys[:-1])}]", f"is not a table, so --set {item} cannot apply")
            table = nested
        table[keys[-1]] = value


def parse(file: str, text: str, environ: dict[str, str] | None = None, overrides: tuple[str, ...] = ()) -> Config:
    """Parse config text, then the --set overrides; `file` names it in messages. Raises ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "", f"is not valid TOML: {e}") from None
    apply_overrides(file, data, overrides)
    for table in data:
        if table not in TOP_TABLES:
            close = difflib.get_close_matches(table, TOP_TABLES, n=1)
            hint = (
                f"did you mean [{close[0]}]?" if close else "known tables: [server], [guard], [admin], [services.NAME]"
            )
            raise ConfigError(file, f"[{table}]", f"is not a known table ({hint})")
    raw_server = data.get("server", {})
    if not isinstance(raw_server, dict):
        raise ConfigError(file, "[server]", f"must be a table (got {describe(raw_server)})")
    t = Table(file, "server", raw_server, SERVER_KEYS)
    server = ServerConfig(
        log_level=t.choice("log_level", "info", LOG_LEVELS),
        log_format=t.choice("log_format", "text", ("text", "json")),
        drain_timeout=t.duration("drain_timeout", "30s"),
        kill_grace=t.duration("kill_grace", "2s"),
        eof_grace=t.duration("eof_grace", "1s"),
    )
    guard = _guard(file, data.get("guard", {}))
    raw_services = data.get("services", {})
    if not isinstance(raw_services, dict) or not raw_services:
        raise ConfigError(file, "[services]", "must define at least one service, like [services.echo]")
    server_env = dict(os.environ if environ is None else environ)
    services = []
    for name, body in raw_services.items():
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(file, f"[services.{name}]", "name must use only letters, digits, - and _")
        services.append(_service(file, name, body, server_env))
    _check_addresses(file, services)
    admin = _admin(file, data.get("admin"))
    return Config(path=file, server=server, services=tuple(services), guard=guard, overrides=overrides, admin=admin)


def _admin(file: str, data: object) -> Address | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(file, "[admin]", f"must be a table (got {describe(data)})")
    t = Table(file, "admin", data, ("listen",))
    if "listen" not in data:
        raise t.fail("listen", 'is required (for example listen = "127.0.0.1:9180")')
    try:
        address = parse_address(data["listen"])
    except ValueError as e:
        raise t.fail("listen", str(e)) from None
    if address.kind != "tcp":
        raise t.fail("listen", f'must be "host:port" (got {describe(data["listen"])})')
    return address


def load(path: str, overrides: tuple[str, ...] = ()) -> Config:
    """Read and parse a config file. Raises ConfigError, also when the file cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(path, "", f"cannot be read: {reason}") from None
    return parse(path, text, overrides=overrides)
