"""Test helpers: a real gsrv process on 127.0.0.1, its log, and plain blocking clients."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import settings

from gsrv.contain.host import discover

PY = sys.executable
pytest_plugins = ["termclient", "inprocess"]  # the `term` fixture: gsrv-term clients; tests/unit's rule

ROOT = Path(__file__).resolve().parent.parent

# `make unit` runs tests/unit with --hypothesis-profile=unit: a tenth of the examples. A test that
# asks for more than the default writes it as a multiple of the profile's (5 * settings.default
# .max_examples), so each profile keeps the test's own proportion.
settings.register_profile("unit", max_examples=10, deadline=None)


def wait_until(
    check: Callable[[], object], timeout: float, what: str | Callable[[], str], interval: float = 0.02
) -> object:
    """Poll check() until it returns something true; fail naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what if isinstance(what, str) else what()}")
        time.sleep(interval)


def service_toml(name: str, command: list[str], **keys: object) -> str:
    lines = [f"[services.{name}]", 'listen = "127.0.0.1:0"', f"command = {toml_list(command)}"]
    for key, value in keys.items():
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def service_with(name: str, command: list[str], table: str, values: dict[str, object] | None,
                 **keys: object) -> str:  # fmt: skip
    """A service and, when given, its sub-table [services.NAME.TABLE] (websocket, http)."""
    text = service_toml(name, command, **keys)
    if values:
        text += f"[services.{name}.{table}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
    return text


def tls_files(tmp_path: Path) -> tuple[Any, dict[str, str]]:
    """A trustme CA (its cert also in ca.pem) and a tls table for a 127.0.0.1 certificate it signed."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return ca, {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(toml_value(i) for i in items) + "]"


def toml_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return toml_list(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value).lower() if isinstance(value, bool) else str(value)


def py_child(code: str) -> list[str]:
    """A child command running Python code (argv list, no shell)."""
    return [PY, "-c", textwrap.dedent(code)]


class Gsrv:
    """A real `gsrv serve` process; its stderr log is read by a thread into `lines`."""

    def __init__(
        self,
        config: Path,
        read_log: bool = True,
        preexec: Callable[[], None] | None = None,
        extra_args: list[str] | None = None,
        prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """prefix: argv that execs the rest (nsenter into a test host's network namespace);
        env: variables added to the test's own environment."""
        self.config = config
        self.proc = subprocess.Popen(
            [*(prefix or []), PY, "-m", "gsrv", "serve", "-c", str(config), *(extra_args or [])],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            preexec_fn=preexec,
            env={**os.environ, **env} if env else None,
        )
        self.ps = psutil.Process(self.proc.pid)
        self._guardian: int | None = None
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self.addresses: dict[str, tuple[str, int]] = {}
        self._deaf = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        if read_log:
            self._reader.start()
            try:
                self._wait_listening()
            except BaseException:
                self.stop()
                raise

    def _wait_listening(self) -> None:
        """Learn each service's bound address from its event=listening line (text or JSON)."""
        pattern = r'event=listening|"event": "listening"'
        count = len(self.config_services())
        wait_until(lambda: self.count_log(pattern) >= count or self._exited(), 10, "gsrv to listen")
        self.wait_log(pattern)  # fails with the log if gsrv exited
        for line in [line for line in self.lines if re.search(pattern, line)]:
            fields = json.loads(line) if line.startswith("{") else dict(re.findall(r"(\w+)=(\S+)", line))
            host, _, port = fields["address"].rpartition(":")
            if port.isdigit():  # a unix socket has a path instead
                self.addresses[fields["service"]] = (host.strip("[]"), int(port))

    def _exited(self) -> bool:
        return self.proc.poll() is not None

    def config_services(self) -> list[str]:
        return re.findall(r"^\[services\.([\w-]+)\]", self.config.read_text(), re.M)

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if self._deaf.is_set():
                return  # stop_reading: gsrv's stderr is a pipe nobody reads from now on

    def stop_reading(self) -> None:
        """Nobody reads gsrv's stderr from the next line on (its pipe fills, as under a stuck
        supervisor)."""
        self._deaf.set()

    def wait_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first log line from index `start` on that matches pattern."""
        rx = re.compile(pattern)
        found: list[str] = []

        def check() -> bool:
            matching = [line for line in self.lines[start:] if rx.search(line)]
            found[:] = matching[:1]
            if not matching and self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader take the last lines
                raise AssertionError(f"gsrv exited ({self.proc.returncode}); log:\n" + "\n".join(self.lines[-20:]))
            return bool(matching)

        wait_until(check, timeout, lambda: f"a log line matching {pattern!r}; log:\n" + "\n".join(self.lines[-20:]))
        return found[0]

    def count_log(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.lines if rx.search(line))

    def address(self, name: str) -> tuple[str, int]:
        return self.addresses[name]

    def connect(self, name: str, timeout: float = 30.0) -> socket.socket:
        return socket.create_connection(self.address(name), timeout=timeout)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def children(self) -> list[psutil.Process]:
        """Processes below gsrv that sessions started (its guardian and its spawner left out)."""
        try:
            found = self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        own = {self.guardian_pid(), self.spawner_pid()}
        return [p for p in found if p.pid not in own]

    def guardian_pid(self) -> int | None:
        if self._guardian is None:
            self._guardian = self._own_child("gsrv.spawn.guardian")
        return self._guardian

    def spawner_pid(self) -> int | None:
        """The spawner running now (a new one replaces one that died)."""
        return self._own_child("gsrv.spawn.spawner", "gsrv-spawner")  # the Python one, or the compiled one

    def _own_child(self, *marks: str) -> int | None:
        try:
            for p in self.ps.children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    argv = " ".join(p.cmdline())
                    if any(mark in argv for mark in marks) and p.status() != psutil.STATUS_ZOMBIE:
                        return int(p.pid)
        except psutil.NoSuchProcess:
            pass
        return None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """A stop now: SIGINT, and once gsrv took that one (two sent back to back arrive as
        one), a second, which skips the announcement and the drain."""
        if self.proc.poll() is None:
            seen = self.count_log(r"event=signal ")
            self.proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 2
            while self.proc.poll() is None and self.count_log(r"event=signal ") == seen and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.close()

    def close(self) -> None:
        if self._reader.is_alive():
            self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


# The compiled spawner is built by the package's build unless GSRV_BUILD_SPAWNER=0 (CI's run of
# the fallback): then the tests that ask for it by name are skipped, and every gsrv runs the Python one.
C_SPAWNER_BUILT = os.environ.get("GSRV_BUILD_SPAWNER", "1") != "0"
SPAWNERS = [
    "python",
    pytest.param("c", marks=pytest.mark.skipif(not C_SPAWNER_BUILT, reason="GSRV_BUILD_SPAWNER=0: not built")),
]


@pytest.fixture
def gsrv(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Gsrv]]:
    """Start gsrv with the given config text (prepended with a [server] table if none). A test
    module's `spawner_impl` fixture (params SPAWNERS) runs each of its gsrvs with that spawner."""
    started: list[Gsrv] = []
    impl = request.getfixturevalue("spawner_impl") if "spawner_impl" in request.fixturenames else None

    def start(text: str, read_log: bool = True, env: dict[str, str] | None = None) -> Gsrv:
        if "[server]" not in text:
            text = '[server]\nkill_grace = "1s"\n' + text
        path = tmp_path / f"gsrv{len(started)}.toml"
        path.write_text(text)
        spawner = ["--set", f"server.spawner={impl}"] if impl else None
        server = Gsrv(path, read_log=read_log, env=env, extra_args=spawner)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send data, half-close, and read the whole reply (raises on a reset)."""

    def send() -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # a reset shows on the reading side below, which raises it

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sender.join(timeout=10)
    return b"".join(chunks)


def push_watching_rss(server: Gsrv, sock: socket.socket, seconds: float) -> tuple[int, int]:
    """Send as fast as the socket takes bytes for `seconds`; (bytes accepted, gsrv's RSS growth
    at its peak meanwhile)."""
    rss_before = peak = server.rss()
    sock.setblocking(False)
    accepted, block = 0, b"\0" * 65536
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            accepted += sock.send(block)
        except BlockingIOError:
            time.sleep(0.005)
            peak = max(peak, server.rss())
    return accepted, max(peak, server.rss()) - rss_before


def random_stream(total: int, seed: int = 1, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes (cheap: SHAKE-256 of a counter)."""
    block = hashlib.shake_256(seed.to_bytes(8, "big")).digest(chunk)
    sent = 0
    n = 0
    while sent < total:
        piece = block if n % 2 == 0 else block[::-1]
        piece = piece[: total - sent]
        # vary each MiB so a reordering would change the digest
        piece = n.to_bytes(8, "big") + piece[8:] if len(piece) > 8 else piece
        yield piece
        sent += len(piece)
        n += 1


def log_time(line: str) -> float:
    """A log line's ts= as seconds since the epoch (what time.time() says)."""
    stamp = re.search(r"ts=(\S+)", line).group(1)  # type: ignore[union-attr]
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC).timestamp()


def lives(pid: int) -> bool:
    """Whether a process is there and not a zombie (one that exits while it is looked at is gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cgroup_gone(server: Gsrv, line: str) -> None:
    """The cgroup a session_end line names is gone (removed behind the session) in every hierarchy."""
    name = re.search(r" cgroup=(\S+)", line)
    if name is None:
        return  # a host without cgroups: the group's end is the ladder's
    paths = [os.path.join(parent, f"gsrv-{server.proc.pid}", name.group(1)) for parent in discover().parents.values()]
    wait_until(lambda: not any(os.path.isdir(p) for p in paths), 10, lambda: f"{paths} still there")
