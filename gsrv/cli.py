"""The command line: serve, check, send. The only composer: it wires config, log, server, signals."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys

import gevent
import psutil
from gevent import get_hub
from gevent.queue import Queue

from gsrv import __version__
from gsrv.accept.guard import Guard, Sampler
from gsrv.accept.listeners import BindError
from gsrv.clients import loadgen
from gsrv.clients import operate as operator
from gsrv.clients.send import send
from gsrv.config import keys
from gsrv.config.parse import TABLES, Config, ServiceConfig, load
from gsrv.config.spawner import C_SPAWNER, chosen
from gsrv.config.units import format_size
from gsrv.contain.root import Root
from gsrv.errors import ConfigError
from gsrv.logs import ErrorStream, Log
from gsrv.ops.admin import Admin
from gsrv.ops.dump import dump
from gsrv.ops.metrics import ProcessState
from gsrv.ops.notify import Notifier
from gsrv.relay.child import Launcher
from gsrv.relay.pump import HAS_SPLICE
from gsrv.server import Server, longest_stop
from gsrv.spawn.client import PYTHON_SPAWNER, Spawner
from gsrv.spawn.guardian import Guardian
from gsrv.upgrade.check import check as upgrade_check

DEFAULT_CONFIG = "conf/gsrv.toml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"Error: {message}\nFor help, use gsrv -h", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gsrv", description="Stream each TCP connection through a command, in bounded memory.")
    parser.add_argument("--version", action="version", version=f"gsrv {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for name, text in (("serve", "serve the config's services in the foreground"),
                       ("check", "validate a config file and list its services")):  # fmt: skip
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
        if name == "check":
            cmd.add_argument("--keys", action="store_true", help="print every key: default, meaning, what SIGHUP does")
        cmd.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="TABLE.KEY=VALUE",
            help="override one key of the file, e.g. --set guard.max_rss=512MiB (repeatable)",
        )
    send = sub.add_parser("send", help="stream stdin to a service and its reply to stdout")
    send.add_argument("target", metavar="HOST:PORT", help="or unix:/path")
    send.add_argument("--raw", action="store_true",
                      help="put this terminal in raw mode while connected (for a pty = true service)")  # fmt: skip
    upgrade = sub.add_parser("upgrade", help="(being built, issue 38) --check: the new code's answer to a record")
    upgrade.add_argument("--check", action="store_true", help="read the state record on --record-fd and answer")
    upgrade.add_argument("--record-fd", type=int, metavar="FD", help="the state record's fd (with --check)")
    load = sub.add_parser("load", help="put load on a service and report throughput, latency, errors")
    loadgen.add_arguments(load)
    for name, text, target in (("sessions", "list the running sessions (the admin listener's /sessions)", None),
                               ("end", "end one session (its stop ladder, reason ended_by_admin)", "ID"),
                               ("pause", "hold a service's new clients in the backlog", "SERVICE"),
                               ("resume", "end the operator's pause or drain of a service", "SERVICE"),
                               ("drain", "pause a service, end its sessions after drain_timeout", "SERVICE"),
                               ):  # fmt: skip
        cmd = sub.add_parser(name, help=text)
        if target:
            cmd.add_argument("target", metavar=target)
        else:
            cmd.add_argument("--service", help="only this service's sessions")
            cmd.add_argument("--json", action="store_true", help="the sessions as JSON, as /sessions gives them")
        cmd.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="the running gsrv's config: its [admin] "
                         f"listener and token (default {DEFAULT_CONFIG})")  # fmt: skip
        cmd.add_argument("--admin", metavar="HOST:PORT", help="the admin listener, when the config's says port 0")
    return parser


def operate(args: argparse.Namespace) -> int:
    """The operator's commands: the admin listener of the config (or --admin), its first token
    (or GSRV_ADMIN_TOKEN)."""
    config = _load(args.config, [])
    if config is None:
        return 2
    if config.admin is None:
        print(f"Error: {args.config} has no [admin] table: the running gsrv has no admin listener to ask",
              file=sys.stderr)  # fmt: skip
        return 2
    address = args.admin or str(config.admin.listen)
    if address.endswith(":0"):
        print(f"Error: {args.config}'s [admin] listen is {address} (any free port): give --admin HOST:PORT, the "
              "address its admin_listening line names", file=sys.stderr)  # fmt: skip
        return 2
    token = os.environ.get("GSRV_ADMIN_TOKEN") or (config.admin.auth.tokens[0] if config.admin.auth else None)
    base = f"http://{address}"
    if args.cmd == "sessions":
        return operator.sessions(base, token, args.service, args.json)
    if args.cmd == "end":
        return operator.act(base, token, f"/sessions/{args.target}/end", f"ended {args.target}")
    past = {"pause": "paused", "resume": "resumed", "drain": "draining"}[args.cmd]
    return operator.act(base, token, f"/services/{args.target}/{args.cmd}", f"{past} {args.target}")


def _load(path: str, overrides: list[str]) -> Config | None:
    try:
        return load(path, tuple(overrides))
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return None


def check(path: str, overrides: list[str], reference: bool = False) -> int:
    if reference:
        print(key_reference())
        return 0
    config = _load(path, overrides)
    if config is None:
        return 2
    print(f"{path}: ok, {len(config.services)} service(s)")
    for svc in config.services:
        print(f"  {svc.name:<12} {svc.listen!s:<22} {shlex.join(svc.command)}")
        limits = dict(keys.changed(svc)) | dict(keys.changed(svc.interact))
        limits["relay"] = _relay(svc)
        if svc.relay == "socket":  # the child holds the connection: no pipes, no buffers
            limits = {k: v for k, v in limits.items() if k not in ("chunk_size", "pipe_size")}
        if svc.interact.pty:  # a terminal, not pipes
            limits.pop("pipe_size", None)
        print(f"  {'':<12} {_pairs(limits)}")
        if svc.interact.prespawn:
            line = (
                "its first line on stdin is the client's (peer_line)"
                if svc.interact.peer_line != "none"
                else ('peer_line = "proxy-v1" gives it on stdin')
            )
            print(f"  {'':<12} prespawn: a child started ahead has no client address in its environment; {line}")
        policy = dict(keys.changed(svc.policy)) | dict(keys.changed(svc.contain))
        auto = svc.contain.kill_scope == "auto"
        policy["kill_scope"] = svc.contain.scope + (" (auto)" if auto else "")  # the one in force, never implied
        if svc.contain.scope == "cgroup":  # what a session's cgroups cost follows from it
            policy["accounting"] = "on" if svc.contain.accounting else "off"
        if svc.launch.stages:
            policy["via"] = shlex.join(svc.launch.prefix)
        if policy:
            print(f"  {'':<12} {_pairs(policy)}")
    stop = f"(a stop takes at most {longest_stop(config.server):g}s: a supervisor's stop timeout must exceed it)"
    print(f"  server: {_pairs(dict(keys.changed(config.server)))} {stop}")
    print(f"  cgroup: root={config.cgroup.root} mode={config.cgroup.host.describe()}")
    impl, why_not_c = chosen(config.server.spawner)
    print(f"  spawner: {impl} ({config.server.spawner}{': ' + why_not_c if why_not_c else ''})")
    guard = config.guard
    print(f"  guard: max_rss={format_size(guard.max_rss)} min_available={guard.min_available} "
          f"interval={guard.interval:g}s")  # fmt: skip
    if config.admin is not None:
        admin = config.admin
        auth = f"bearer ({len(admin.auth.tokens)} tokens from {admin.auth.path})" if admin.auth else "none"
        print(f"  admin: listen={admin.listen} auth={auth} control={'on' if admin.control else 'off'}")
    return 0


def _pairs(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def _relay(svc: ServiceConfig) -> str:
    """The relay key and what it means for this service."""
    needs_bytes = [name for name, on in (("TLS", svc.policy.tls is not None), ("pty", svc.interact.pty),
                                         ("websocket", svc.interact.websocket is not None)) if on]  # fmt: skip
    if needs_bytes:
        return f"copy ({' and '.join(needs_bytes)})"
    if svc.relay == "socket":
        return "socket (the child holds the connection)"
    if svc.relay != "auto":
        return svc.relay
    return "auto (splice)" if HAS_SPLICE else "auto (copy)"


def key_reference() -> str:
    """Every key, from its declaration: table, name, default, what it is, what a SIGHUP does."""
    rows = []
    for table, classes in TABLES.items():
        for name, k in (item for cls in classes for item in keys.declared(cls)):
            if k.required:
                default = "(required)"
            elif k.default is None:
                default = f"(not set; e.g. {keys.toml(k.example)})"
            else:
                default = keys.toml(k.default)
            rows.append(f"[{table}] {name} = {default}  # {k.doc} (SIGHUP: {k.reload})")
    return "\n".join(rows)


class _CannotStart(Exception):
    """A start that failed after something was made: the message for the user (exit 1)."""


def serve(path: str, overrides: list[str]) -> int:
    """Serve until stopped. What each step makes is undone by the ExitStack, in reverse, on
    every way out: a start that fails halfway leaves no listener, guardian or cgroup behind."""
    config = _load(path, overrides)
    if config is None:
        return 2
    log = Log(2, config.server.log_level, config.server.log_format)
    try:
        with contextlib.ExitStack() as undo:
            _serve(config, log, undo)
    except _CannotStart as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    log.info("stopped")
    log.flush()
    return 0


def _serve(config: Config, log: Log, undo: contextlib.ExitStack) -> None:
    errors = ErrorStream(log)  # what Python or gevent would write to fd 2: log lines, never a blocking write
    undo.enter_context(contextlib.redirect_stderr(errors))
    get_hub().exception_stream = errors
    host = config.cgroup.host
    root = Root(host) if host.mode != "none" else None
    # no child outlives gsrv, even one killed with SIGKILL: the guardian ends what is left
    guardian = Guardian(log, host.mode, tuple(root.paths) if root else ())
    impl, why_not_c = chosen(config.server.spawner)
    if why_not_c is not None:
        log.warning("spawner_fallback", impl=impl, why=why_not_c, next='the Python spawner runs (spawner = "auto")')
    program = (C_SPAWNER,) if impl == "c" else PYTHON_SPAWNER
    spawner = Spawner(log, root.spawner_homes if root is not None else (), guardian.owns, program, impl)
    server = Server(config, log, Launcher(spawner, root, guardian))
    starting = [True]
    undo.callback(lambda: server.stop_listening() if starting[0] else None)  # a start that failed: its listeners
    try:
        server.bind()
        admin = _admin(config, server, log)
    except BindError as e:
        raise _CannotStart(str(e)) from None
    guardian.start()  # the processes once the listeners are bound: a start that fails starts none
    undo.callback(guardian.close)
    swept: list[str] = []
    try:
        if root is not None:
            swept = root.create(guardian.pid)
            undo.callback(_remove_root, root, log)
            root.enable(set().union(*(s.contain.limits.controllers(host.mode) for s in config.services)))
    except OSError as e:
        raise _CannotStart(f"[cgroup] root: cannot make gsrv's cgroups: {e.strerror or e}") from None
    try:
        spawner.start()
    except OSError as e:
        raise _CannotStart(f"cannot start the spawner: {e.strerror or e}") from None
    undo.callback(spawner.close)
    log.info("containment", cgroups=host.describe(), root=",".join(root.paths) if root else None,
             services=",".join(f"{s.name}:{s.contain.scope}" for s in config.services),
             swept=",".join(swept) or None)  # fmt: skip
    guard = Guard(config.guard, Sampler(), server.pause_accept, server.resume_accept, log)
    guard.check()  # before any listener accepts: a gsrv started under pressure starts paused
    if admin is not None:
        admin.metrics_state = lambda: _state(server, guard, log, spawner)
        admin.control.guard = lambda: _guard_status(guard, server)
    notifier = Notifier.from_environ(os.environ, log)  # under systemd's Type=notify
    if notifier is not None:
        server.lifecycle.observers.append(notifier.changed)
        undo.callback(notifier.close)
    signals: Queue[int] = Queue()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        gevent.signal_handler(signum, signals.put, signum)  # handlers only record
    worker = gevent.spawn(_handle_signals, server, guard, signals)
    server.start()
    starting[0] = False  # from here on the drain closes the listeners
    guard.start()
    undo.callback(guard.stop)
    if admin is not None:
        admin.start(server.flush_metrics)
        undo.callback(admin.stop)
    undo.callback(worker.kill)  # first of all: no signal is handled from here on (a reload would open listeners)
    server.stopped.wait()


def _remove_root(root: Root, log: Log) -> None:
    left = root.remove()
    if left:
        log.warning("cgroups_left", cgroups=",".join(left), next="the guardian removes them once they are empty")


def _admin(config: Config, server: Server, log: Log) -> Admin | None:
    """The admin endpoint and the metrics it serves, if [admin] asks for one."""
    if config.admin is None:
        return None
    admin = Admin(config.admin, server.lifecycle.not_ready, log)
    admin.control.operator = server
    server.metrics = admin.metrics
    return admin


def _state(server: Server, guard: Guard, log: Log, spawner: Spawner) -> ProcessState:
    """What a scrape reads: the server's services, the guard's figures, the log's drops."""
    lifecycle = server.lifecycle
    last = guard.last
    return ProcessState(
        services=server.service_states(),
        accept_paused=lifecycle.accept_paused,
        accept_pauses=guard.pauses + int(lifecycle.drain_started is not None),
        accept_paused_seconds=guard.paused_seconds() + lifecycle.drain_seconds(),
        guard_rss=last.rss if last else None,
        guard_available=last.available if last else None,
        greenlets=server.greenlets(),
        log_dropped=log.dropped,
        cgroups_left=spawner.cgroups_left,
    )


def _guard_status(guard: Guard, server: Server) -> dict[str, object]:
    """The memory guard now against its thresholds (the status page)."""
    last, cfg = guard.last, server.config.guard
    figures: dict[str, object] = {"paused": server.lifecycle.memory_pressure, "max_rss": cfg.max_rss}
    if last is not None:
        figures |= {"rss": last.rss, "available": last.available, "total": last.total,
                    "min_available": cfg.min_available.of(last.total)}  # fmt: skip
    return figures


def _handle_signals(server: Server, guard: Guard, signals: Queue[int]) -> None:
    """Each signal in turn; one whose work fails is logged, and the next is still handled (a
    SIGTERM after a failed reload must still stop gsrv)."""
    stops = [0]
    while True:
        signum = signals.get()
        try:
            _handle_signal(server, guard, signum, stops)
        except Exception as e:
            server.log.error("signal_failed", signal=signal.Signals(signum).name, error=f"{type(e).__name__}: {e}",
                             next="handling the next signal")  # fmt: skip


def _handle_signal(server: Server, guard: Guard, signum: int, stops: list[int]) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGUSR1:
        pending = sum(s.gate.waiting for s in server.services)
        children = len(psutil.Process().children(recursive=True)) - 2  # less the guardian and the spawner
        dump(server.log, server.active_sessions, pending, children)
        return
    if signum == signal.SIGHUP:
        server.log.info("signal", signal=name, next="reload")
        new = server.reload()
        if new is not None:
            guard.configure(new.guard)
        return
    stops[0] += 1
    if stops[0] == 1:
        server.log.info("signal", signal=name, next="announce" if server.config.server.drain_announce else "drain")
        server.begin_stop()
    else:
        server.log.warning("signal", signal=name, next="stop now, skipping the drain")
        server.force_stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "check":
        return check(args.config, args.overrides, args.keys)
    if args.cmd == "serve":
        return serve(args.config, args.overrides)
    if args.cmd == "load":
        return loadgen.main(args)
    if args.cmd == "upgrade":
        if not args.check or args.record_fd is None:
            print("Error: only `gsrv upgrade --check --record-fd FD` is built yet (issue 38)", file=sys.stderr)
            return 2
        return upgrade_check(args.record_fd)
    if args.cmd in ("sessions", "end", "pause", "resume", "drain"):
        return operate(args)
    return send(args.target, args.raw)
