"""The composer: `gsrv serve` wires config, log, guardian, cgroups, spawner, server, admin and
signals, and undoes what it made on every way out. With an upgrade's record (gsrv/upgrade/take.py)
it takes each part over from the previous code instead of making it anew.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import gevent
import psutil
from gevent import get_hub
from gevent.queue import Queue

from gsrv.accept.guard import Guard, Sampler
from gsrv.accept.listeners import BindError
from gsrv.config.parse import Config, load
from gsrv.config.spawner import C_SPAWNER, chosen
from gsrv.contain.root import Root
from gsrv.errors import ConfigError, GsrvError
from gsrv.logs import ErrorStream, Log
from gsrv.ops.admin import Admin
from gsrv.ops.dump import dump
from gsrv.ops.metrics import ProcessState
from gsrv.ops.notify import Notifier
from gsrv.relay.child import Launcher
from gsrv.server import Server
from gsrv.spawn.client import PYTHON_SPAWNER, Spawner
from gsrv.spawn.guardian import Guardian
from gsrv.upgrade.leave import Upgrades
from gsrv.upgrade.take import Taken

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def load_or_say(path: str, overrides: list[str]) -> Config | None:
    """The config, or None once its error is printed."""
    try:
        return load(path, tuple(overrides))
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return None


class _CannotStart(Exception):
    """A start that failed after something was made: the message for the user (exit 1)."""


def serve(path: str, overrides: list[str]) -> int:
    """Serve until stopped. What each step makes is undone by the ExitStack, in reverse, on
    every way out: a start that fails halfway leaves no listener, guardian or cgroup behind."""
    try:
        taken = Taken.from_environ()  # an upgrade's new code: what the previous one left
    except GsrvError as e:
        print(f"Error: cannot take over from the previous code: {e}", file=sys.stderr)
        return 1
    config = load_or_say(path, overrides)
    log = Log(2, config.server.log_level, config.server.log_format) if config else Log(2)
    if taken is not None:
        log.take_over(taken.record.state.get("log", []))
    if config is None:
        if taken is not None:
            taken.failed_now(f"the config {path} does not load", log)
        return 2
    try:
        with contextlib.ExitStack() as undo:
            try:
                _serve(config, log, undo, taken)
            except Exception as e:
                if taken is not None and not taken.done:  # before the undo: it would end the sessions
                    taken.failed_now(f"{type(e).__name__}: {e}", log)
                raise
    except _CannotStart as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    log.info("stopped")
    log.flush()
    return 0


def _serve(config: Config, log: Log, undo: contextlib.ExitStack, taken: Taken | None = None) -> None:
    errors = ErrorStream(log)  # what Python or gevent would write to fd 2: log lines, never a blocking write
    undo.enter_context(contextlib.redirect_stderr(errors))
    get_hub().exception_stream = errors
    host = config.cgroup.host
    root = Root(host) if host.mode != "none" else None
    # no child outlives gsrv, even one killed with SIGKILL: the guardian ends what is left
    guardian = Guardian(log, host.mode, tuple(root.paths) if root else ())
    impl, why_not_c = chosen(config.server.spawner)
    if taken is not None:  # the running spawner is kept: its children stay its own
        impl = str(taken.state("spawner").get("impl", impl))
    elif why_not_c is not None:
        log.warning("spawner_fallback", impl=impl, why=why_not_c, next='the Python spawner runs (spawner = "auto")')
    program = (C_SPAWNER,) if impl == "c" else PYTHON_SPAWNER
    spawner = Spawner(log, root.spawner_homes if root is not None else (), guardian.owns, program, impl)
    server = Server(config, log, Launcher(spawner, root, guardian))
    starting = [True]
    undo.callback(lambda: server.stop_listening() if starting[0] else None)  # a start that failed: its listeners
    try:
        server.bind(taken.listener if taken is not None else None)
        admin_fd = taken.listener("admin", str(config.admin.listen)) if taken and config.admin else None
        admin = _admin(config, server, log, admin_fd)
    except BindError as e:
        raise _CannotStart(str(e)) from None
    if taken is not None:
        taken.guardian(guardian)
        server.ids_given = int(taken.state("server").get("ids_given", 0))
    else:
        guardian.start()  # the processes once the listeners are bound: a start that fails starts none
    undo.callback(guardian.close)
    swept: list[str] = []
    try:
        if root is not None:
            swept = root.create(guardian.pid)  # (an upgrade's: the same pid's, kept)
            undo.callback(_remove_root, root, log)
            root.enable(set().union(*(s.contain.limits.controllers(host.mode) for s in config.services)))
    except OSError as e:
        raise _CannotStart(f"[cgroup] root: cannot make gsrv's cgroups: {e.strerror or e}") from None
    moved = taken.sessions(server) if taken is not None else []
    try:
        if taken is not None:
            taken.spawner(spawner, moved)
        else:
            spawner.start()
    except OSError as e:
        raise _CannotStart(f"cannot start the spawner: {e.strerror or e}") from None
    undo.callback(spawner.close)
    log.info("containment", cgroups=host.describe(), root=",".join(root.paths) if root else None,
             services=",".join(f"{s.name}:{s.contain.scope}" for s in config.services),
             swept=",".join(swept) or None)  # fmt: skip
    guard = Guard(config.guard, Sampler(), server.pause_accept, server.resume_accept, log)
    guard.check()  # before any listener accepts: a gsrv started under pressure starts paused
    upgrades = Upgrades(server, spawner, guardian, log, lambda: admin.fd if admin is not None else None)
    if admin is not None:
        admin.metrics_state = lambda: _state(server, guard, log, spawner)
        admin.control.guard = lambda: _guard_status(guard, server)
        admin.control.upgrades = upgrades
        upgrades.counted = admin.metrics.upgraded
        if taken is not None:
            admin.metrics.take_over(taken.state("metrics"))
    notifier = Notifier.from_environ(os.environ, log)  # under systemd's Type=notify
    if notifier is not None:
        server.lifecycle.observers.append(notifier.changed)
        undo.callback(notifier.close)
    signals: Queue[int] = Queue()
    for signum in HANDLED:
        gevent.signal_handler(signum, signals.put, signum)  # handlers only record
    worker = gevent.spawn(_handle_signals, server, guard, upgrades, signals)
    server.start()
    starting[0] = False  # from here on the drain closes the listeners
    if taken is not None:
        running = taken.run(server, moved, log)
        taken.operator(server)
        taken.close_rest(log)
        upgrades.took_over(taken.state("upgrade"), taken.served(log, len(moved), running))
        taken.unblock()  # the signals the previous code blocked before its exec: handled from here on
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


def _admin(config: Config, server: Server, log: Log, taken: int | None) -> Admin | None:
    """The admin endpoint and the metrics it serves, if [admin] asks for one (`taken`: the
    listener's fd an upgrade's previous code left)."""
    if config.admin is None:
        return None
    admin = Admin(config.admin, server.lifecycle.not_ready, log, taken)
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


def _handle_signals(server: Server, guard: Guard, upgrades: Upgrades, signals: Queue[int]) -> None:
    """Each signal in turn; one whose work fails is logged, and the next is still handled (a
    SIGTERM after a failed reload must still stop gsrv)."""
    stops = [0]
    while True:
        signum = signals.get()
        try:
            _handle_signal(server, guard, upgrades, signum, stops)
        except Exception as e:
            server.log.error("signal_failed", signal=signal.Signals(signum).name, error=f"{type(e).__name__}: {e}",
                             next="handling the next signal")  # fmt: skip


def _handle_signal(server: Server, guard: Guard, upgrades: Upgrades, signum: int, stops: list[int]) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGUSR2:
        server.log.info("signal", signal=name, next="upgrade")
        upgrades.ask(None, {"by": "SIGUSR2"}, wait=False)
        return
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
