"""gsrv under the real supervisord, from a temporary copy of the shipped supervisord.conf."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import PY, ROOT, exchange, random_stream, service_toml, wait_until

BIN = Path(sys.executable).parent
MiB = 1024 * 1024


class Supervisor:
    """supervisord in the foreground on a rewritten copy of supervisord.conf in tmp."""

    def __init__(self, tmp: Path, gsrv_toml: str, multi: list[str] | None = None) -> None:
        """multi: a config per fcgi-program process; they share a unix socket, .run/multi.sock."""
        self.tmp = tmp
        (tmp / ".run").mkdir()
        (tmp / "gsrv.toml").write_text(gsrv_toml)
        text = (ROOT / "supervisord.conf").read_text()
        text = text.replace("%(here)s/.venv/bin/gsrv", f"{PY} -m gsrv").replace(
            "%(here)s/conf/gsrv.toml", str(tmp / "gsrv.toml")
        )
        text = text.replace("directory = %(here)s", f"directory = {ROOT}")
        if multi is None:
            text = text[: text.index("[fcgi-program:gsrv-multi]")]
        else:
            for n, body in enumerate(multi):
                (tmp / f"multi-{n}.toml").write_text(body)
            text = text.replace("%(here)s/conf/gsrv-multi.toml", "%(here)s/multi-%(process_num)d.toml")
            text = text.replace("socket = tcp://127.0.0.1:7101", "socket = unix://%(here)s/.run/multi.sock")
            text = text.replace("admin.listen=127.0.0.1:919%(process_num)d", "admin.listen=127.0.0.1:0")
        self.conf = tmp / "supervisord.conf"
        self.conf.write_text(text)
        self.proc = subprocess.Popen([str(BIN / "supervisord"), "-c", str(self.conf)], cwd=tmp,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        wait_until(lambda: (tmp / ".run" / "supervisor.sock").exists(), 20, "supervisord's control socket")

    def ctl(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run([str(BIN / "supervisorctl"), "-c", str(self.conf), *args],
                                capture_output=True, text=True, timeout=timeout)  # fmt: skip
        return result.stdout

    def log(self, name: str = "gsrv") -> str:
        path = self.tmp / ".run" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def wait_log(self, pattern: str, name: str = "gsrv", timeout: float = 20) -> str:
        found = wait_until(lambda: re.search(pattern, self.log(name)), timeout,
                           lambda: f"{pattern!r} in {name}.log:\n{self.log(name)[-2000:]}")  # fmt: skip
        return found.group(0)  # type: ignore[union-attr]

    def address(self, service: str, name: str = "gsrv") -> tuple[str, int]:
        line = self.wait_log(rf"event=listening service={service} address=\S+", name)
        host, port = line.rsplit("=", 1)[1].rsplit(":", 1)
        return host, int(port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.ctl("shutdown")
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[list[Supervisor]]:
    started: list[Supervisor] = []
    yield started
    for s in started:
        s.stop()


SERVER = '[server]\ndrain_timeout = "20s"\nkill_grace = "1s"\n'


@pytest.mark.timeout(120)
def test_supervisorctl_stop_lets_a_transfer_finish(supervisor, tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, SERVER + service_toml("echo", ["cat"]))
    supervisor.append(sup)
    address = sup.address("echo")
    wait_until(lambda: "RUNNING" in sup.ctl("status", "gsrv"), 20, "gsrv RUNNING in supervisorctl status")
    gsrv_pid = int(sup.ctl("pid", "gsrv").strip())
    sent, got, received = hashlib.sha256(), hashlib.sha256(), 0
    started = threading.Event()

    def push(sock: socket.socket) -> None:
        for n, piece in enumerate(random_stream(20 * MiB, seed=5, chunk=256 * 1024)):
            sent.update(piece)
            sock.sendall(piece)
            if n == 4:
                started.set()
            time.sleep(0.02)
        sock.shutdown(socket.SHUT_WR)

    with socket.create_connection(address, timeout=60) as sock:
        sender = threading.Thread(target=push, args=(sock,))
        sender.start()
        assert started.wait(20)
        children = [p.pid for p in psutil.Process(gsrv_pid).children(recursive=True)]
        stopper = threading.Thread(target=lambda: sup.ctl("stop", "gsrv"))
        stopper.start()
        while chunk := sock.recv(65536):
            got.update(chunk)
            received += len(chunk)
        sender.join(timeout=30)
        stopper.join(timeout=60)
    assert received == 20 * MiB and got.hexdigest() == sent.hexdigest()
    sup.wait_log(r"stopped: gsrv \(exit status 0\)", "supervisord")
    assert "STOPPED" in sup.ctl("status", "gsrv")
    wait_until(lambda: not any(psutil.pid_exists(p) for p in children), 5, "gsrv's children to be gone")


@pytest.mark.timeout(120)
def test_supervisorctl_hup_reloads_services_and_survives_a_broken_file(supervisor, tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, SERVER + service_toml("old", ["cat"]))
    supervisor.append(sup)
    old = sup.address("old")
    in_flight = socket.create_connection(old, timeout=30)
    in_flight.sendall(b"before ")
    assert in_flight.recv(100) == b"before "
    (tmp_path / "gsrv.toml").write_text(SERVER + service_toml("new", ["tr", "a-z", "A-Z"]))
    sup.ctl("signal", "HUP", "gsrv")
    sup.wait_log(r"event=reloaded .*added=new .*removed=old")
    assert exchange(in_flight, b"after") == b"after"  # the transfer in flight was not dropped
    in_flight.close()
    with socket.create_connection(sup.address("new"), timeout=30) as sock:
        assert exchange(sock, b"hello") == b"HELLO"
    (tmp_path / "gsrv.toml").write_text(SERVER + service_toml("new", ["cat"], max_sesions=3))
    sup.ctl("signal", "HUP", "gsrv")
    sup.wait_log(r'event=reload_failed .*unknown key \\"max_sesions\\"')
    with socket.create_connection(sup.address("new"), timeout=30) as sock:
        assert exchange(sock, b"still") == b"STILL"


@pytest.mark.timeout(180)
def test_fcgi_program_processes_share_one_socket(supervisor, tmp_path: Path) -> None:
    child = ["sh", "-c", 'echo "$GSRV_SESSION"']
    body = service_toml("multi", child).replace('"127.0.0.1:0"', '"fd:0"')
    guard = '[guard]\ninterval = "100ms"\nresume_samples = 2\n'
    sup = Supervisor(tmp_path, SERVER + service_toml("unused", ["cat"]), multi=[guard + body, guard + body])
    supervisor.append(sup)
    for n in range(2):
        sup.wait_log(r"event=listening service=multi address=unix:\S+ via=fd:0", f"gsrv-multi-{n}")
    path = str(tmp_path / ".run" / "multi.sock")

    def session() -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)  # a session that waits longer has timed out
            sock.connect(path)
            return exchange(sock, b"").decode().split("-")[0]

    def serve_many(count: int) -> dict[str, int]:
        by_pid: dict[str, int] = {}
        lock = threading.Lock()

        def worker(n: int) -> None:
            for _ in range(n):
                pid = session()
                with lock:
                    by_pid[pid] = by_pid.get(pid, 0) + 1

        threads = [threading.Thread(target=worker, args=(count // 10,)) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return by_pid

    both = serve_many(200)
    assert sum(both.values()) == 200 and len(both) == 2, both
    # pause process 0 with its guard (a reload with max_rss below its RSS): process 1 takes all
    (tmp_path / "multi-0.toml").write_text(guard + 'max_rss = "1MiB"\n' + body)
    sup.ctl("signal", "HUP", "gsrv-multi:gsrv-multi-0")
    sup.wait_log(r"event=accept_paused reason=rss", "gsrv-multi-0")
    paused_pid = sup.ctl("pid", "gsrv-multi:gsrv-multi-0").strip()
    only = serve_many(100)
    assert sum(only.values()) == 100 and paused_pid not in only, only


@pytest.mark.timeout(180)
def test_fcgi_program_restarts_each_process_in_turn_under_load_without_a_failed_session(supervisor, tmp_path) -> None:
    body = service_toml("multi", ["sha256sum"]).replace('"127.0.0.1:0"', '"fd:0"')
    sup = Supervisor(tmp_path, SERVER + service_toml("unused", ["cat"]), multi=[SERVER + body] * 2)
    supervisor.append(sup)
    names = [f"gsrv-multi-{n}" for n in range(2)]
    for name in names:
        sup.wait_log(r"event=listening service=multi address=unix:\S+ via=fd:0", name)
    shared = tmp_path / ".run" / "multi.sock"
    argv = [PY, "-m", "gsrv", "load", f"unix:{shared}", "--sessions", "1000000", "--concurrency", "16",
            "--bytes", "256KiB", "--verify", "--json"]  # fmt: skip
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for name in names:
            served = lambda: sup.log(name).count("event=session_end")  # noqa: E731,B023
            wait_until(lambda: served() >= 20, 30, f"{name} to serve sessions")  # noqa: B023
            assert "started" in sup.ctl("restart", f"gsrv-multi:{name}"), sup.log(name)[-2000:]
            assert sup.log(name).count("event=stopped") == 1, "the old process drained and exited"
            sup.wait_log(r"event=stopped[\s\S]*event=listening service=multi", name)
            after = served()
            wait_until(lambda: served() >= after + 20, 30, f"the new {name} to serve sessions")  # noqa: B023
    finally:
        report = stop_load(load)
    assert report["failed"] == 0 and report["sessions"] > 0, (report["errors"], report["error_examples"])
    for name in names:
        ends = [line for line in sup.log(name).splitlines() if "event=session_end" in line]
        assert all(" exit=0 " in line and "reason=eof" in line for line in ends), name


@pytest.mark.timeout(240)
def test_upgrades_under_supervisord_keep_the_pid_running_and_every_loaded_session(supervisor, tmp_path) -> None:
    """Five upgrades asked the supervisor's way (`supervisorctl signal USR2`) while `gsrv load`
    runs at a steady rate: the supervised PID never changes, status stays RUNNING throughout,
    no session fails and no connection is refused."""
    config = SERVER + '[admin]\nlisten = "127.0.0.1:0"\n' + service_toml("sum", ["sha256sum"])
    sup = Supervisor(tmp_path, config)
    supervisor.append(sup)
    host, port = sup.address("sum")
    wait_until(lambda: "RUNNING" in sup.ctl("status", "gsrv"), 20, "gsrv RUNNING in supervisorctl status")
    pid = sup.ctl("pid", "gsrv").strip()
    argv = [PY, "-m", "gsrv", "load", f"{host}:{port}", "--sessions", "1000000", "--concurrency", "8",
            "--rate", "100", "--bytes", "64KiB", "--verify", "--json"]  # fmt: skip
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    statuses: list[str] = []
    watching = threading.Event()

    def watch() -> None:  # supervisorctl status through the upgrades
        while not watching.is_set():
            words = sup.ctl("status", "gsrv", timeout=30).split()
            statuses.append(words[1] if len(words) > 1 else "?")
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for n in range(1, 6):
            served = sup.log().count("event=session_end")
            wait_until(lambda: sup.log().count("event=session_end") >= served + 20, 60, "sessions served")  # noqa: B023
            assert "gsrv: signalled" in sup.ctl("signal", "USR2", "gsrv")
            sup.wait_log(rf"event=upgrade upgrade={n} result=ok", timeout=60)
            assert sup.ctl("pid", "gsrv").strip() == pid
    finally:
        watching.set()
        watcher.join(timeout=60)
        report = stop_load(load)
    assert report["failed"] == 0 and report["sessions"] > 100, (report["errors"], report["error_examples"])
    assert statuses and set(statuses) == {"RUNNING"}, statuses
    assert sup.log().count("event=spawner_started") == 1


def stop_load(load: subprocess.Popen[str]) -> dict[str, Any]:
    """SIGINT to a `gsrv load --json` (it stops starting sessions and finishes those running):
    its report."""
    load.send_signal(signal.SIGINT)
    try:
        out, _err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait(timeout=10)
    report: dict[str, Any] = json.loads(out)
    return report
