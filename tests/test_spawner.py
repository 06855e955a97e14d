"""The spawner (gsrv/spawn): every child is started by it, never by gsrv's own pid; its death
costs gsrv nothing but the spawns in flight; its resource errors pause accept like gsrv's own."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import psutil
import pytest
from conftest import SPAWNERS, exchange, lives, service_toml, wait_until

from gsrv.config.spawner import C_SPAWNER
from gsrv.spawn import wire
from gsrv.spawn.client import PYTHON_SPAWNER

SIGPIPE_BIT = 1 << (signal.SIGPIPE - 1)
PROGRAMS = {"python": PYTHON_SPAWNER, "c": (C_SPAWNER,)}


@pytest.fixture(params=SPAWNERS, autouse=True)
def spawner_impl(request: pytest.FixtureRequest) -> str:
    """Every test here runs against both spawners, the compiled one and the Python one."""
    return str(request.param)


SIGXFSZ_BIT = 1 << (signal.SIGXFSZ - 1)


def _ask(address: tuple[str, int], data: bytes = b"", timeout: float = 20.0) -> bytes:
    with socket.create_connection(address, timeout=timeout) as sock:
        return exchange(sock, data)


def _one_thread_ask(address: tuple[str, int], data: bytes) -> str:
    """ok, short (a clean end after a truncated reply) or reset. One thread sends and reads:
    with a second one sending, a reset could be taken by its send, and the read then sees a
    plain EOF (data this small fits in the socket buffers, so nothing waits)."""
    try:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
    except OSError:
        return "reset"
    return "ok" if reply == data else "short"


def _direct_children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found |= {int(n) for n in (task / "children").read_text().split()}
    return found


def test_no_child_is_forked_by_gsrv_itself(gsrv):
    """2,000 sessions: each command's parent is the spawner (awk prints its own PPid), and gsrv's
    own children are only its guardian and its spawner."""
    server = gsrv(service_toml("ppid", ["awk", "/^PPid/ { print $2 }", "/proc/self/status"], max_sessions=64))
    spawner = server.spawner_pid()
    assert spawner is not None
    address = server.address("ppid")
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        parents = list(pool.map(lambda _: _ask(address), range(2000), timeout=300))
    assert len(parents) == 2000
    assert set(parents) == {f"{spawner}\n".encode()}, set(parents)
    assert _direct_children(server.proc.pid) == {server.guardian_pid(), spawner}
    # awk does not read its stdin: it may end before the client's EOF (child_exit), a clean end too
    ended = r"event=session_end service=ppid .*exit=0 reason=(eof|child_exit)"
    wait_until(lambda: server.count_log(ended) == 2000, 10, "2,000 session_end lines, each a clean end")


def test_a_child_gets_sigpipe_and_sigxfsz_at_their_defaults(gsrv):
    """Python ignores SIGPIPE and SIGXFSZ, and an ignored signal survives exec: the spawner
    resets both for the child (`yes | head -1` ends by SIGPIPE only then)."""
    server = gsrv(service_toml("sigs", ["grep", "^SigIgn", "/proc/self/status"]))
    ignored = int(_ask(server.address("sigs")).split()[1], 16)
    assert not ignored & SIGPIPE_BIT and not ignored & SIGXFSZ_BIT, hex(ignored)


def test_a_spawner_killed_under_load_is_replaced(gsrv):
    """SIGKILL the spawner while sessions start and others run: gsrv goes on, a new spawner
    serves, the running sessions end by the end rules (their children are gsrv's to reap now),
    each session ends with one line, and nothing is left behind."""
    server = gsrv(service_toml("cat", ["cat"], max_sessions=64))
    address = server.address("cat")
    first = server.spawner_pid()
    held = [socket.create_connection(address, timeout=20) for _ in range(5)]
    for sock in held:  # each running: its child answered
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
    stop = threading.Event()
    outcomes: list[str] = []

    def load() -> None:
        while not stop.is_set():
            outcomes.append(_one_thread_ask(address, b"x" * 1000))

    workers = [threading.Thread(target=load) for _ in range(8)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: len(outcomes) >= 200, 30, "200 sessions under load")
        os.kill(first, signal.SIGKILL)
        server.wait_log(r"event=spawner_died ")
        wait_until(lambda: server.spawner_pid() not in (None, first), 10, "a new spawner")
        before = len(outcomes)
        wait_until(lambda: len(outcomes) >= before + 200, 30, "200 sessions through the new spawner")
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert outcomes.count("short") == 0, "a session ended cleanly with a truncated reply"
    assert server.proc.poll() is None
    for sock in held:  # the old spawner's children, reparented to gsrv, still relay and end by the rules
        sock.sendall(b"pong")
        assert sock.recv(4) == b"pong"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
        sock.close()
    wait_until(lambda: server.count_log(r"event=session_end ") >= len(outcomes) + 5, 20, "every session's line")
    ends = [line for line in server.lines if "event=session_end " in line]
    reasons = {re.search(r"reason=(\w+)", line).group(1) for line in ends}  # type: ignore[union-attr]
    assert reasons <= {"eof", "spawn_failed"}, reasons
    assert len(ends) == len(outcomes) + 5, "one line per session"
    wait_until(lambda: not server.children(), 10, "no child left")
    zombies = [p.pid for p in server.ps.children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]
    assert not zombies
    assert _direct_children(server.proc.pid) == {server.guardian_pid(), server.spawner_pid()}


def test_emfile_in_the_spawner_pauses_accept_and_resumes(gsrv):
    """The spawner out of fds (its limit lowered from outside): the kernel cannot hand it the
    child's stdio, it answers EMFILE, gsrv parks the client and pauses accept; with the limit
    back the parked client is served, nobody refused."""
    server = gsrv(service_toml("cat", ["cat"]))
    assert _ask(server.address("cat"), b"warm") == b"warm"  # the spawner is up, its own fds open
    spawner = server.spawner_pid()
    assert spawner is not None
    in_use = len(os.listdir(f"/proc/{spawner}/fd"))
    soft = psutil.Process(spawner).rlimit(psutil.RLIMIT_NOFILE)[0]
    subprocess.run(["prlimit", f"--pid={spawner}", f"--nofile={in_use + 1}:"], check=True, timeout=10)
    result: list[bytes] = []
    client = threading.Thread(target=lambda: result.append(_ask(server.address("cat"), b"parked")))
    client.start()
    line = server.wait_log(r"event=accept_paused service=cat reason=resources")
    assert "Too many open files" in line, line
    subprocess.run(["prlimit", f"--pid={spawner}", f"--nofile={soft}:"], check=True, timeout=10)
    client.join(20)
    assert result == [b"parked"]
    server.wait_log(r"event=session_end service=cat .*reason=eof")
    assert server.count_log(r"reason=spawn_failed") == 0


def test_gsrv_killed_leaves_no_session_behind(gsrv):
    """gsrv SIGKILLed: its spawner ends at EOF, the guardian ends every session's processes."""
    server = gsrv(service_toml("sleep", ["sleep", "300"]))
    held = [server.connect("sleep") for _ in range(3)]
    wait_until(lambda: len(server.children()) >= 3, 10, "three sleeps")
    family = [p.pid for p in server.children()] + [server.spawner_pid()]
    server.proc.kill()
    server.proc.wait(10)
    wait_until(lambda: not any(lives(pid) for pid in family), 15, "the sessions and the spawner to end")
    for sock in held:
        sock.close()


def test_a_request_the_spawner_cannot_start_ends_only_its_session(gsrv, tmp_path):
    """A request the spawner cannot carry out (the service's cwd removed after the config was
    read: its chdir fails; a client can no longer bring one, as a NUL in a WebSocket path once
    did: that is a 400 now): that session ends spawn_failed, the spawner lives on and serves
    the next."""
    work = tmp_path / "work"
    work.mkdir()
    server = gsrv(service_toml("echo", ["cat"], cwd=str(work)))
    spawner = server.spawner_pid()
    work.rmdir()
    with server.connect("echo") as sock, contextlib.suppress(OSError):
        while sock.recv(65536):
            pass
    line = server.wait_log(r"event=session_end service=echo ")
    assert "reason=spawn_failed" in line and "No such file" in line, line
    assert server.spawner_pid() == spawner and "spawner_died" not in "\n".join(server.lines)
    work.mkdir()
    with server.connect("echo") as sock:
        assert exchange(sock, b"next") == b"next"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first", [wire.Hello(wire.VERSION + 1), wire.Reap(1, ())])
def test_a_spawner_spoken_to_in_another_version_says_so_and_exits(first: wire.Message, spawner_impl: str) -> None:
    """The wire's first message is each side's Hello: the spawner answers its own (what gsrv
    checks), and leaves a peer of another version (or one that skips the Hello) with an EOF
    and a line on stderr, having started nothing."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        proc = subprocess.Popen([*PROGRAMS[spawner_impl], str(theirs.fileno()), "1"],
                                pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True)  # fmt: skip
        theirs.close()
        ours.settimeout(20)
        ours.send(wire.encode(first))
        assert wire.decode(ours.recv(1 << 16)) == [wire.Hello(wire.VERSION)]
        assert ours.recv(1 << 16) == b""
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "speaks wire version" in err, (proc.returncode, err)


def test_the_log_says_which_spawner_runs(gsrv, spawner_impl):
    """`[server] spawner` as asked: spawner_started names the one running, and it serves."""
    server = gsrv(service_toml("echo", ["cat"]))
    assert f"impl={spawner_impl}" in server.wait_log(r"event=spawner_started "), server.lines
    assert _ask(server.address("echo"), b"hi") == b"hi"
