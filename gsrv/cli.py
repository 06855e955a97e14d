"""The command line: serve, check, send. The only composer: it wires config, log, server, signals."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from gsrv import __version__
from gsrv.clients import loadgen
from gsrv.clients import operate as operator
from gsrv.clients.send import send
from gsrv.compose import load_or_say, serve
from gsrv.config import keys
from gsrv.config.parse import TABLES, ServiceConfig
from gsrv.config.spawner import chosen
from gsrv.config.units import format_size
from gsrv.relay.pump import HAS_SPLICE
from gsrv.server import longest_stop
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
    load = sub.add_parser("load", help="put load on a service and report throughput, latency, errors")
    loadgen.add_arguments(load)
    for name, text, target in (("sessions", "list the running sessions (the admin listener's /sessions)", None),
                               ("end", "end one session (its stop ladder, reason ended_by_admin)", "ID"),
                               ("pause", "hold a service's new clients in the backlog", "SERVICE"),
                               ("resume", "end the operator's pause or drain of a service", "SERVICE"),
                               ("drain", "pause a service, end its sessions after drain_timeout", "SERVICE"),
                               ("upgrade", "re-exec the running gsrv into the installed code, its sessions kept "
                                "(the same PID); exit 0 once the new code serves", None),
                               ):  # fmt: skip
        cmd = sub.add_parser(name, help=text)
        if target:
            cmd.add_argument("target", metavar=target)
        elif name == "upgrade":
            cmd.add_argument("--exec", dest="exec_path", metavar="PATH", help="the new code's gsrv entry point "
                             "(default: the running executable, as it was started)")  # fmt: skip
            cmd.add_argument("--check", action="store_true", help=argparse.SUPPRESS)  # the new code's, run by gsrv
            cmd.add_argument("--record-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
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
    config = load_or_say(args.config, [])
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
    if args.cmd == "upgrade":
        return operator.upgrade(base, token, args.exec_path)
    if args.cmd == "end":
        return operator.act(base, token, f"/sessions/{args.target}/end", f"ended {args.target}")
    past = {"pause": "paused", "resume": "resumed", "drain": "draining"}[args.cmd]
    return operator.act(base, token, f"/services/{args.target}/{args.cmd}", f"{past} {args.target}")


def check(path: str, overrides: list[str], reference: bool = False) -> int:
    if reference:
        print(key_reference())
        return 0
    config = load_or_say(path, overrides)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "check":
        return check(args.config, args.overrides, args.keys)
    if args.cmd == "serve":
        return serve(args.config, args.overrides)
    if args.cmd == "load":
        return loadgen.main(args)
    if args.cmd == "upgrade" and args.check:
        if args.record_fd is None:
            print("Error: gsrv upgrade --check needs --record-fd FD (gsrv runs it itself)", file=sys.stderr)
            return 2
        return upgrade_check(args.record_fd)
    if args.cmd in ("sessions", "end", "pause", "resume", "drain", "upgrade"):
        return operate(args)
    return send(args.target, args.raw)
