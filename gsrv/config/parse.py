"""The TOML config file: parsed with tomllib into frozen dataclasses, every value checked.

Each key is declared once, as a field of these dataclasses (config/keys.py); each error names
the file, the table and key, what was expected and what was found.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from dataclasses import dataclass
from typing import Any

import psutil

from gsrv.config import keys
from gsrv.config.address import Address, collide, is_loopback, parse_address
from gsrv.config.auth import Credentials, parse_auth
from gsrv.config.contain import CgroupConfig, Containment, parse_cgroup, parse_containment
from gsrv.config.http import HttpConfig
from gsrv.config.interact import Interaction, parse_interaction
from gsrv.config.keys import AT_ONCE, key, required
from gsrv.config.launch import Launch, compose
from gsrv.config.policy import Policy, parse_policy
from gsrv.config.spawner import CHOICES as SPAWNERS
from gsrv.config.spawner import c_spawner_problem
from gsrv.config.table import Table, did_you_mean
from gsrv.config.units import Amount, describe, format_size
from gsrv.config.web import WebSocketConfig
from gsrv.errors import ConfigError

TOP_TABLES = ("server", "guard", "admin", "cgroup", "services")
GUARD_RELOAD = "applies from the next sample on; a pause in progress lasts until relief"
REBIND = "only when the listener is bound anew (its address changed)"


def _address(t: Table, name: str, default: object) -> Address:
    try:
        return parse_address(t.data.get(name, default))
    except ValueError as e:
        raise t.fail(name, str(e)) from None


def _cwd(t: Table, name: str, default: object) -> str | None:
    cwd = t.data.get(name, default)
    if cwd is not None and not (isinstance(cwd, str) and os.path.isdir(cwd)):
        raise t.fail(name, f"must be an existing directory (got {describe(cwd)})")
    return cwd


def _relay(t: Table, name: str, default: object) -> str:
    relay = t.choice(name, str(default), ("auto", "splice", "copy", "socket"))
    if relay == "splice" and not hasattr(os, "splice"):
        raise t.fail(name, 'is "splice" but this platform has no splice(2): use "auto" or "copy"')
    return relay


def _pipe_size(t: Table, name: str, default: object) -> int:
    """0 (the kernel's default) or a capacity up to the kernel's pipe-max-size."""
    size = t.size(name, int(str(default)), 0, 2**62)
    if size == 0:
        return 0
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = 1024 * 1024
    if not 4096 <= size <= ceiling:
        span = f"between 4KiB and {format_size(ceiling)} (fs.pipe-max-size)"
        raise t.fail(name, f"must be 0 (the kernel's default) or {span} (got {describe(t.data[name])})")
    return size


def _interval(t: Table, name: str, default: object) -> float:
    interval = t.duration(name, str(default))
    if not 0.05 <= interval <= 60:
        raise t.fail(name, f"must be between 50ms and 60s (got {describe(t.data[name])})")
    return interval


@dataclass(frozen=True)
class ServerConfig:
    log_level: str = key(keys.choice("debug", "info", "warning", "error"), "info",
                         '"debug" | "info" | "warning" | "error"', reload=AT_ONCE)  # fmt: skip
    log_format: str = key(keys.choice("text", "json"), "text",
                          '"text" (logfmt, key=value) | "json" (one object per line, same keys)',
                          reload=AT_ONCE)  # fmt: skip
    drain_announce: float = key(keys.duration("off"), "0s", "on SIGTERM/SIGINT, before the drain: how long /readyz "
                                'answers 503 "draining" while the listeners still accept (above the balancer\'s '
                                "inter x fall + timeout check)", reload="applies to the next stop",
                                shown=True)  # fmt: skip
    drain_timeout: float = key(keys.duration(), "30s", "on SIGTERM/SIGINT: how long running sessions may finish",
                               reload="applies to the next drain", shown=True)  # fmt: skip
    upgrade_wait: float = key(keys.duration(), "10s", "gsrv upgrade: how long sessions that cannot move (TLS, "
                              "and those README lists) may finish before the exec ends them (reason=shutdown "
                              "upgrade=1)", reload="applies to the next upgrade", shown=True)  # fmt: skip
    kill_grace: float = key(keys.duration(), "2s", "stop ladder: time between TERM and KILL to a session's group",
                            shown=True)  # fmt: skip
    eof_grace: float = key(keys.duration(), "1s", "how long to wait for the child's exit after its stdout closed, "
                           "and for stdout to close after it exited (a grandchild may hold it)")  # fmt: skip
    spawner: str = key(keys.choice(*SPAWNERS), "auto", '"auto" (the compiled spawner where the build made it and it '
                       'is root\'s or gsrv\'s, not group- or world-writable; else the Python one, with a warning) | '
                       '"c" (that one, or a config error) | "python"', reload="needs a restart")  # fmt: skip


@dataclass(frozen=True)
class GuardConfig:
    """Memory guard thresholds: pressure starts at either limit, ends after resume_samples
    consecutive samples below both resume values."""

    interval: float = key(_interval, "1s", "how often it samples (50ms .. 60s)", reload=GUARD_RELOAD)
    max_rss: int = key(keys.size(1024**2, 2**50), "1GiB", "pressure when gsrv's own RSS reaches this",
                       reload=GUARD_RELOAD)  # fmt: skip
    min_available: Amount = key(keys.amount(), "5%", "... or when available memory falls below this (a size, or "
                                "a % of total)", reload=GUARD_RELOAD)  # fmt: skip
    resume_rss: int = key(keys.size(0, 2**50), None, "relief needs RSS below this (default: 90% of max_rss)",
                          reload=GUARD_RELOAD, example="921.6MiB", value=int(0.9 * 1024**3))  # fmt: skip
    resume_available: Amount = key(keys.amount(), None, "... and available at or above this (default: 1.5 x "
                                   "min_available)", reload=GUARD_RELOAD, example="7.5%",
                                   value=Amount(percent=7.5))  # fmt: skip
    resume_samples: int = key(keys.integer(1), 3, "... in this many consecutive samples", reload=GUARD_RELOAD)


def _admin_auth(t: Table, name: str, default: object) -> Credentials | None:
    """A bearer token file for the operator's view: basic auth is the services' business."""
    credentials = parse_auth(t, name, default)
    if credentials is not None and credentials.kind != "bearer":
        raise t.fail(name, "must be { bearer = FILE } (a token a line: the CLI and scripts send one)")
    return credentials


@dataclass(frozen=True)
class AdminConfig:
    listen: Address = required(_address, '"host:port" of /metrics, /healthz, /readyz, the status page, /sessions, '
                               "/services", "127.0.0.1:9180", reload="needs a restart")  # fmt: skip
    auth: Credentials | None = key(_admin_auth, None, "{ bearer = FILE }: a token a line; guards /sessions, "
                                   "/services and the status page's data (needed when listen is not loopback); "
                                   "/metrics, /healthz and /readyz stay open", reload="needs a restart",
                                   example={"bearer": "/etc/gsrv/admin.tokens"})  # fmt: skip
    control: bool = key(keys.flag(), True, "false: /sessions and /services are read-only (a POST gets 403)",
                        reload="needs a restart")  # fmt: skip


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    listen: Address = required(_address, '"host:port", "[v6]:port", "unix:/path", "fd:N" or "systemd:NAME"',
                               "127.0.0.1:7001", reload="a new address is bound before the old one closes")  # fmt: skip
    command: tuple[str, ...] = required(keys.strings(non_empty=True), "argv list, never a shell string",
                                        ["sha256sum"])  # fmt: skip
    max_sessions: int = key(keys.integer(1), 256, "sessions at once; more clients wait in the listen backlog",
                            reload=AT_ONCE, shown=True)  # fmt: skip
    chunk_size: int = key(keys.size(4 * 1024, 1024 * 1024), "64KiB", "the most gsrv holds per direction",
                          shown=True)  # fmt: skip
    backlog: int = key(keys.integer(1), 1024, "listen(2) backlog", reload=REBIND, shown=True)
    idle_timeout: float = key(keys.duration("no limit"), "0s", "end a session with no byte either way for this long",
                              shown=True)  # fmt: skip
    session_timeout: float = key(keys.duration("no limit"), "0s", "end any session after this long", shown=True)
    env: tuple[tuple[str, str], ...] = key(keys.string_table(), {}, "extra environment for the child")
    pass_env: tuple[str, ...] = key(keys.strings(), ["PATH", "LANG", "LC_ALL", "TZ"],
                                    "variables passed on from gsrv's own environment")  # fmt: skip
    cwd: str | None = key(_cwd, None, "the child's working directory (default: gsrv's)", example="/srv/work",
                          value=None)  # fmt: skip
    stderr: str = key(keys.choice("log", "discard", "stdout", "websocket"), "log", '"log" | "discard" | "stdout" | '
                      '"websocket" (messages of their own, with transport = "websocket")', shown=True)  # fmt: skip
    nonzero_exit: str = key(keys.choice("close", "reset"), "close", "a non-zero exit: FIN or reset", shown=True)
    keepalive: float = key(keys.duration("off"), "60s", "TCP keepalive idle time",
                           reload="applies to connections accepted after it", shown=True)  # fmt: skip
    mode: int = key(keys.bits("0660"), None, "unix sockets only: the socket file's permissions", reload=REBIND,
                    example="0660", value=0o660, show=lambda bits: f"{bits:04o}")  # fmt: skip
    relay: str = key(_relay, "auto", '"auto" (splice where the platform has it, else copy) | "splice" | "copy" | '
                     '"socket" (the child gets the connection itself as stdin and stdout)', shown=True)  # fmt: skip
    pipe_size: int = key(_pipe_size, 0, "the child's stdin and stdout pipe capacity; 0: the kernel's", shown=True,
                         show=lambda size: format_size(size) if size else "default")  # fmt: skip
    launch: Launch = Launch((), "")  # derived: command[0] found on the child's PATH at load, behind its stages
    base_env: tuple[tuple[str, str], ...] = ()  # derived: pass_env's variables of gsrv's environment, then env
    policy: Policy = Policy()  # its keys are the service table's too: TLS, PROXY, access, per-IP limits, privileges
    contain: Containment = Containment()  # ... and these: kill_scope, max_memory, max_pids, max_cpu, sandbox
    interact: Interaction = Interaction()  # ... and these: pty, transport, websocket


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    services: tuple[ServiceConfig, ...]
    guard: GuardConfig = GuardConfig()
    overrides: tuple[str, ...] = ()  # --set items, applied again on every reload
    admin: AdminConfig | None = None  # /metrics, /healthz, /readyz; None: no admin endpoint
    cgroup: CgroupConfig = CgroupConfig()


# The tables a file may hold, and the dataclasses that declare their keys.
TABLES: dict[str, tuple[type, ...]] = {
    "server": (ServerConfig,), "guard": (GuardConfig,), "admin": (AdminConfig,), "cgroup": (CgroupConfig,),
    "services.NAME": (ServiceConfig, Policy, Containment, Interaction),
    "services.NAME.websocket": (WebSocketConfig,), "services.NAME.http": (HttpConfig,),
}  # fmt: skip


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


def _table(file: str, name: str, data: object) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(file, f"[{name}]", f"must be a table (got {describe(data)})")
    return data


def _service(file: str, name: str, data: object, server_env: dict[str, str], cgroup: CgroupConfig) -> ServiceConfig:
    known = keys.names(ServiceConfig, Policy, Containment, Interaction)
    t = Table(file, f"services.{name}", _table(file, f"services.{name}", data), known)
    values = keys.read_all(t, ServiceConfig)
    listen: Address = values["listen"]
    if "mode" in t.data and listen.kind != "unix":
        raise t.fail("mode", f'applies only to listen = "unix:/path" (this service listens on {listen})')
    policy = parse_policy(t, server_env)
    if listen.kind == "unix" and policy.proxy_protocol != "off":
        raise t.fail("proxy_protocol", f'needs a TCP listen address (listen = "{listen}" here): a unix socket\'s peer '
                     "has no address to trust")  # fmt: skip
    if values["relay"] == "socket":
        _check_handoff(t, listen, policy, values["idle_timeout"])
    interact = parse_interaction(t, values, policy, server_env)  # a pty amends stderr's and TERM's defaults
    child_env = {k: server_env[k] for k in values["pass_env"] if k in server_env} | dict(values["env"])
    executable = _resolve_command(t, values["command"], child_env, values.get("cwd"))
    contain = parse_containment(t, cgroup, server_env, interact.pty)
    stages = dict(policy.stages + contain.stages + interact.stages)
    launch = compose(values["command"], executable, stages, policy.umask, values.get("cwd"), values["pipe_size"],
                     contain, interact.pty)  # fmt: skip
    return ServiceConfig(name=name, launch=launch, policy=policy, contain=contain, interact=interact,
                         base_env=tuple(child_env.items()), **values)  # fmt: skip


def _check_handoff(t: Table, listen: Address, policy: Policy, idle_timeout: float) -> None:
    """relay = "socket": the keys that need gsrv to see the bytes, or that size its pipes and
    buffers, cannot apply; a unix socket gives no last-activity time for idle_timeout."""
    if policy.tls is not None:
        raise t.fail("relay", 'is "socket", which cannot go with tls: gsrv must see the bytes to decrypt them '
                     '(use relay = "auto" with tls)')  # fmt: skip
    for name in ("pipe_size", "chunk_size"):
        if name in t.data:
            raise t.fail(name, 'sizes the pipe relays\' pipes and buffers: with relay = "socket" the child reads '
                         "and writes the connection itself (remove the key)")  # fmt: skip
    if listen.kind == "unix" and idle_timeout:
        raise t.fail("idle_timeout", 'with relay = "socket" needs TCP_INFO\'s last-activity times, which a unix '
                     "socket does not have (use session_timeout)")  # fmt: skip


def _guard(file: str, data: object) -> GuardConfig:
    t = Table(file, "guard", _table(file, "guard", data), keys.names(GuardConfig))
    values = keys.read_all(t, GuardConfig)
    max_rss, min_available = values["max_rss"], values["min_available"]
    resume_rss = values.setdefault("resume_rss", int(max_rss * 0.9))
    if resume_rss > max_rss:
        got = describe(t.data["resume_rss"])
        raise t.fail("resume_rss", f"must not be above max_rss {format_size(max_rss)} (got {got})")
    resume_available = values.setdefault("resume_available", min_available.scaled(1.5))
    total = int(psutil.virtual_memory().total)  # compares a size with a percentage
    if resume_available.of(total) < min_available.of(total):
        got = describe(t.data["resume_available"])
        raise t.fail("resume_available", f"must not be below min_available {min_available} (got {got})")
    return GuardConfig(**values)


def _admin(file: str, data: object) -> AdminConfig | None:
    if data is None:
        return None
    t = Table(file, "admin", _table(file, "admin", data), keys.names(AdminConfig))
    admin = AdminConfig(**keys.read_all(t, AdminConfig))
    if admin.listen.kind != "tcp":
        raise t.fail("listen", f'must be "host:port" (got {describe(t.data["listen"])})')
    if admin.auth is None and not is_loopback(admin.listen.host):
        raise t.fail("listen", f"is {admin.listen}, not loopback: the sessions and services of this gsrv would be "
                     "anyone's who can reach it; add auth = { bearer = FILE } (a token a line)")  # fmt: skip
    return admin


def _check_addresses(file: str, services: list[ServiceConfig]) -> None:
    for i, svc in enumerate(services):
        for other in services[:i]:
            if collide(svc.listen, other.listen):
                where = f"[services.{svc.name}] listen"
                raise ConfigError(file, where, f"{svc.listen} collides with {other.listen} of [services.{other.name}]")


def _no_nul(file: str, value: object, where: tuple[str, ...]) -> None:
    """No string of the file holds a NUL: none can be a file name, an argument or a variable."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for name, item in items:
        here = (*where, str(name))
        if "\0" in str(name) or isinstance(item, str) and "\0" in item:
            table, key = ".".join(here[:-1]), here[-1]
            raise ConfigError(file, f"[{table}] {key}" if table else key,
                              "holds a NUL character (\\u0000): no file name, argument or variable can")  # fmt: skip
        _no_nul(file, item, here)


def apply_overrides(file: str, data: dict[str, Any], overrides: tuple[str, ...]) -> None:
    """`--set table.key=value` (value in TOML syntax, or a bare string) into the parsed file."""
    for item in overrides:
        path, eq, raw = item.partition("=")
        names = path.strip().split(".")
        if not eq or len(names) < 2 or not all(names):
            raise ConfigError(
                "--set", item, "must be TABLE.KEY=VALUE, like guard.max_rss=1MiB or services.echo.max_sessions=8"
            )
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: a string
        table = data
        for name in names[:-1]:
            nested = table.setdefault(name, {})
            if not isinstance(nested, dict):
                raise ConfigError(file, f"[{'.'.join(names[:-1])}]", f"is not a table, so --set {item} cannot apply")
            table = nested
        table[names[-1]] = value


def parse(
    file: str, text: str, environ: dict[str, str] | None = None, overrides: tuple[str, ...] = (),
    running_cgroup: CgroupConfig | None = None,
) -> Config:  # fmt: skip
    """Parse config text, then the --set overrides; `file` names it in messages (a reload
    gives the running [cgroup], whose host it keeps). Raises ConfigError."""
    try:
        return _parse(file, text, environ, overrides, running_cgroup)
    except RecursionError:  # tomllib's own, or a check's walk over a value nested ~1,000 deep
        raise ConfigError(file, "", "nests arrays or tables too deeply for gsrv to read") from None


def _parse(file: str, text: str, environ: dict[str, str] | None, overrides: tuple[str, ...],
           running_cgroup: CgroupConfig | None) -> Config:  # fmt: skip
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "", f"is not valid TOML: {e}") from None
    apply_overrides(file, data, overrides)
    _no_nul(file, data, ())
    for table in data:
        if table not in TOP_TABLES:
            hint = (
                did_you_mean(table, TOP_TABLES, "[{}]")
                or "known tables: [server], [guard], [admin], [cgroup], [services.NAME]"
            )
            raise ConfigError(file, f"[{table}]", f"is not a known table ({hint})")
    raw_server = _table(file, "server", data.get("server", {}))
    server = ServerConfig(**keys.read_all(Table(file, "server", raw_server, keys.names(ServerConfig)), ServerConfig))
    if server.spawner == "c" and (problem := c_spawner_problem()):
        raise ConfigError(file, "[server] spawner", f'is "c", but {problem} (use "auto" or "python")')
    guard = _guard(file, data.get("guard", {}))
    raw_services = data.get("services", {})
    if not isinstance(raw_services, dict) or not raw_services:
        raise ConfigError(file, "[services]", "must define at least one service, like [services.echo]")
    server_env = dict(os.environ if environ is None else environ)
    raw_cgroup = _table(file, "cgroup", data.get("cgroup", {}))
    cgroup = parse_cgroup(Table(file, "cgroup", raw_cgroup, keys.names(CgroupConfig)), running_cgroup)
    services = []
    for name, body in raw_services.items():
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(file, f"[services.{name}]", "name must use only letters, digits, - and _")
        services.append(_service(file, name, body, server_env, cgroup))
    _check_addresses(file, services)
    admin = _admin(file, data.get("admin"))
    return Config(path=file, server=server, services=tuple(services), guard=guard, overrides=overrides, admin=admin,
                  cgroup=cgroup)  # fmt: skip


def load(path: str, overrides: tuple[str, ...] = (), running_cgroup: CgroupConfig | None = None) -> Config:
    """Read and parse a config file. Raises ConfigError, also when the file cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(path, "", f"cannot be read: {reason}") from None
    return parse(path, text, overrides=overrides, running_cgroup=running_cgroup)
