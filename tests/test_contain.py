"""Containment: a cgroup per session. Nothing of a session outlives it (daemons included, and
after gsrv is SIGKILLed), its limits hold (pids, memory, CPU), its accounting is right, and its
cgroups go away. Real cgroups: these tests need root and a cgroup host (CI runs as root)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import PY, ROOT, exchange, py_child, service_toml, wait_until

from gsrv.contain.cgfiles import remove_tree
from gsrv.contain.host import discover
from gsrv.contain.root import Root
from gsrv.contain.scope import Limits, Scope
from gsrv.spawn.pool import READY

HOST = discover()
pytestmark = pytest.mark.timeout(120)
# Under CI=true (root, cgroups) a host without them fails these tests instead of skipping them.
needs_cgroups = pytest.mark.skipif(
    HOST.mode == "none" and os.environ.get("CI") != "true", reason=f"no usable cgroups here: {HOST.why}"
)
needs_v1 = pytest.mark.skipif(HOST.mode != "v1", reason="a v1 (or hybrid) cgroup host")
UNIFIED = "/sys/fs/cgroup/unified"


def _marker() -> str:
    """A number sleep accepts and nothing else on the machine has in its argv."""
    return f"313.{random.randrange(10**8, 10**9)}"


def _alive_with(marker: str, program: bytes = b"") -> list[int]:
    """Processes whose argv holds the marker (and whose argv[0] is program, if given)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read()
            if marker.encode() in argv and argv.startswith(program):
                found.append(int(entry))
        except OSError:
            pass
    return found


def _roots(pid: int) -> list[str]:
    return [os.path.join(parent, f"gsrv-{pid}") for parent in HOST.parents.values()]


def _session_dirs(pid: int) -> list[str]:
    return [d for root in _roots(pid) if os.path.isdir(root) for d in os.listdir(root) if os.path.isdir(f"{root}/{d}")]


def _swept(server, kinds: int = 1) -> None:  # type: ignore[no-untyped-def]
    """Every session's cgroups removed behind it: what is left below gsrv's root is the
    spawner's pool (made ahead, never used: at most READY per kind of session, no process)."""
    used = set(re.findall(r" cgroup=(\S+)", "\n".join(server.lines)))
    last: list[set[str]] = [set()]

    def done() -> bool:
        names = last[0] = set(_session_dirs(server.proc.pid))
        return not names & used and len(names) <= READY * kinds

    wait_until(done, 10, lambda: f"only the pool left (used: {sorted(used)[:5]}...; found {sorted(last[0])})")
    for root in _roots(server.proc.pid):
        for name in last[0]:
            with contextlib.suppress(FileNotFoundError):
                assert Path(root, name, "cgroup.procs").read_text() == "", f"a process in pool cgroup {name}"


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def _talk(address: tuple[str, int], data: bytes = b"") -> bytes:
    with socket.create_connection(address, timeout=30) as sock:
        return exchange(sock, data)


@needs_cgroups
def test_daemons_end_with_their_session(gsrv):
    """200 sessions start a setsid daemon, 50 a double-forked one: none is alive once its
    session has ended, and the session cgroups are gone."""
    mark = _marker()
    setsid = ["sh", "-c", f"setsid sleep {mark}1 </dev/null >/dev/null 2>&1 & echo started"]
    double = py_child(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execvp("sleep", ["sleep", "{mark}2"])
            os._exit(0)
        os.wait()
        print("started", flush=True)
    """)
    server = gsrv(service_toml("setsid", setsid) + service_toml("double", double))
    assert "services=setsid:cgroup,double:cgroup" in server.wait_log("event=containment")
    ended = 0
    for service, count in (("setsid", 200), ("double", 50)):
        for first in range(0, count, 10):
            results: list[bytes] = []
            address = server.address(service)
            threads = [threading.Thread(target=lambda a=address, r=results: r.append(_talk(a))) for _ in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            assert results == [b"started\n"] * 10, results
            ended += 10
            wait_until(lambda n=ended: server.count_log("event=session_end") >= n, 20, f"{ended} session_end lines")
            assert _alive_with(mark) == [], f"a daemon outlived its session (sessions {first}..{first + 9})"
    _swept(server, kinds=1)  # both services' sessions have the same cgroups


@needs_cgroups
def test_nothing_survives_gsrv_sigkill(gsrv):
    """gsrv SIGKILLed mid-session: the guardian ends every process of every session cgroup,
    daemons included, and removes gsrv's cgroups."""
    mark = _marker()
    server = gsrv(service_toml("held", ["sh", "-c", f"setsid sleep {mark} </dev/null >/dev/null 2>&1 & echo up; cat"]))
    socks = [server.connect("held") for _ in range(5)]
    for s in socks:
        assert s.recv(10) == b"up\n"
    wait_until(lambda: len(_alive_with(mark, b"sleep\0")) == 5, 10, "5 daemons")
    pid = server.proc.pid
    assert all(os.path.isdir(root) for root in _roots(pid))
    server.proc.kill()
    server.proc.wait(timeout=10)
    wait_until(lambda: not _alive_with(mark), 15, lambda: f"daemons to end: {_alive_with(mark)}")
    wait_until(lambda: not any(os.path.exists(root) for root in _roots(pid)), 15, "gsrv's cgroups to be removed")
    for s in socks:
        s.close()


@needs_cgroups
def test_fork_bomb_is_held_at_max_pids(gsrv):
    """A fork bomb under max_pids = 32 never has more than 32 processes, its line says
    pids_limited=1, and a session of another service meanwhile is served exactly."""
    mark = _marker()
    bomb = py_child(f"""
        import os, time
        end = time.monotonic() + 30  # "{mark}": every process of the bomb has it in its argv
        while time.monotonic() < end:  # each process forks copies of itself, forever
            try:
                os.fork()
            except BlockingIOError:  # EAGAIN: the session's pids limit
                time.sleep(0.01)
    """)
    server = gsrv(service_toml("bomb", bomb, max_pids=32, session_timeout="3s", stderr="discard", accounting=True)
                  + service_toml("cat", ["cat"]))  # fmt: skip
    bomb_sock = server.connect("bomb")
    most = 0
    deadline = time.monotonic() + 1.5
    data = os.urandom(1 << 20)
    assert _talk(server.address("cat"), data) == data
    while time.monotonic() < deadline:
        most = max(most, len(_alive_with(mark)))
        time.sleep(0.05)
    line = server.wait_log(r"event=session_end service=bomb", timeout=20)
    fields = _fields(line)
    assert fields["reason"] == "session_timeout" and fields["pids_limited"] == "1", line
    assert 1 <= int(fields["pids_peak"]) <= 32, line
    assert 0 < most <= 32
    bomb_sock.close()
    wait_until(lambda: not _alive_with(mark), 10, "the bomb's processes to be gone")


@needs_cgroups
def test_memory_limit_oom_kills_inside_the_session(gsrv):
    """A child allocating past max_memory = 64MiB is OOM-killed in its cgroup; another session
    and gsrv itself are unaffected."""
    hog = py_child("""
        import sys
        held = []
        print("allocating", flush=True)
        for _ in range(400):
            held.append(bytearray(1 << 20))
        print("survived", flush=True)
    """)
    server = gsrv(service_toml("hog", hog, max_memory="64MiB", accounting=True) + service_toml("cat", ["cat"]))
    rss = server.rss()
    other = server.connect("cat")
    with server.connect("hog") as hog:
        assert hog.recv(100) == b"allocating\n"
        with pytest.raises(ConnectionResetError):  # a child killed by a signal: its client sees a reset
            exchange(hog, b"")
    line = server.wait_log("event=session_end service=hog")
    fields = _fields(line)
    assert fields["signal"] == "KILL" and fields["oom_kill"] == "1", line
    assert int(fields["mem_peak"]) <= 64 * 2**20, line
    assert exchange(other, b"still here") == b"still here"
    other.close()
    assert server.proc.poll() is None and server.rss() < rss + 16 * 2**20


@needs_cgroups
def test_cpu_limit_holds_a_busy_child(gsrv):
    """max_cpu = 0.25: a child that spins for 3 s of wall time gets at most ~30% of a CPU."""
    spin = py_child("""
        import time
        end = time.monotonic() + 3
        while time.monotonic() < end:
            pass
        print(round(time.process_time(), 3), flush=True)
    """)
    server = gsrv(service_toml("spin", spin, max_cpu=0.25, accounting=True))
    used = float(_talk(server.address("spin")))
    assert 0 < used <= 0.9, f"the child used {used:.2f} s of CPU in 3 s"  # the quota's bound (0.75 s), not a speed
    line = server.wait_log("event=session_end service=spin")
    assert float(_fields(line)["cpu_ms"]) <= 1000, line


@needs_cgroups
def test_cpu_ms_matches_the_childs_own_rusage(gsrv):
    burn = py_child("""
        import resource, hashlib
        data = b"x" * 65536
        for _ in range(6000):
            hashlib.sha256(data).digest()
        r = resource.getrusage(resource.RUSAGE_SELF)
        print(round((r.ru_utime + r.ru_stime) * 1000, 1), flush=True)
    """)
    server = gsrv(service_toml("burn", burn, accounting=True))
    own_ms = float(_talk(server.address("burn")))
    line = server.wait_log("event=session_end service=burn")
    cpu_ms = float(_fields(line)["cpu_ms"])
    assert own_ms > 100, own_ms
    assert abs(cpu_ms - own_ms) <= 0.1 * own_ms, f"cgroup cpu_ms={cpu_ms} against the child's getrusage {own_ms}"


@needs_v1
def test_a_session_gets_only_the_cgroups_its_keys_need(gsrv):
    """No limit and no accounting: the kill's hierarchy alone (freezer); accounting adds the
    counters' (cpuacct, memory, pids), a limit its controller's. The command reads where it is."""
    where = ["cat", "/proc/self/cgroup"]
    server = gsrv(service_toml("plain", where) + service_toml("counted", where, accounting=True)
                  + service_toml("capped", where, max_pids=16))  # fmt: skip
    own = f"/gsrv-{server.proc.pid}/"
    made = {}
    for service in ("plain", "counted", "capped"):
        lines = [line.split(":", 2) for line in _talk(server.address(service)).decode().splitlines()]
        made[service] = {name for _, names, path in lines if own in path for name in names.split(",")}
    assert made["plain"] == {"freezer"}, made
    assert made["counted"] == {"freezer", "cpuacct", "memory", "pids"} & set(HOST.parents), made
    assert made["capped"] == {"freezer", "pids"}, made


@needs_cgroups
def test_a_session_reads_only_its_own_counters(gsrv):
    """With accounting, a session that allocates 64 MiB, then one that allocates 1 MiB: the
    second's mem_peak is its own (a pool cgroup is used once, never again)."""
    if not HOST.can("mem_peak"):
        pytest.skip("no memory controller for sessions here")
    alloc = py_child("""
        import sys
        size = int(sys.stdin.readline())
        held = bytearray(size)
        held[::4096] = b"x" * len(held[::4096])
        print(len(held), flush=True)
    """)
    server = gsrv(service_toml("alloc", alloc, accounting=True))
    peaks = []
    for size in (64 * 2**20, 2**20):
        mark = len(server.lines)
        assert _talk(server.address("alloc"), b"%d\n" % size) == b"%d\n" % size
        line = server.wait_log(r"event=session_end service=alloc ", start=mark)
        peaks.append(int(_fields(line)["mem_peak"]))
    assert peaks[0] >= 64 * 2**20, peaks
    assert peaks[1] < 32 * 2**20, peaks


@needs_cgroups
def test_cgroups_return_to_baseline_after_2000_sessions(gsrv):
    server = gsrv(service_toml("true", ["true"]))
    pid = server.proc.pid

    def client(n: int) -> None:
        for _ in range(n):
            _talk(server.address("true"))

    threads = [threading.Thread(target=client, args=(400,)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    wait_until(lambda: server.count_log("event=session_end") >= 2000, 20, "2000 session_end lines")
    _swept(server)
    server.stop()
    assert not any(os.path.exists(root) for root in _roots(pid)), "gsrv's root left behind at its stop"


@pytest.mark.skipif(discover(UNIFIED).mode != "v2", reason="no cgroup v2 hierarchy here")
def test_v2_root_places_with_no_helper(gsrv):
    """[cgroup] root on the unified hierarchy: v2 mode; the spawner enters the session's
    cgroup for the spawn, so the command's parent is the spawner, no interpreter runs in front
    of it, and its first look at /proc/self/cgroup is the session's; a daemon still ends with
    the session; cpu_ms is counted (accounting)."""
    mark = _marker()
    cmd = [
        "sh",
        "-c",
        f"setsid sleep {mark} </dev/null >/dev/null 2>&1 & cat /proc/self/cgroup; grep PPid /proc/$$/status",
    ]
    server = gsrv(f'[cgroup]\nroot = "{UNIFIED}"\n' + service_toml("v2", cmd, accounting=True))
    assert 'cgroups="v2 ' in server.wait_log("event=containment")
    reply = _talk(server.address("v2")).decode()
    line = server.wait_log("event=session_end service=v2")
    name = _fields(line)["cgroup"]
    assert re.search(rf"^0::/gsrv-{server.proc.pid}/{name}$", reply, re.M), reply
    assert re.search(rf"^PPid:\s+{server.spawner_pid()}$", reply, re.M), reply
    assert "cpu_ms=" in line and "mem_peak" not in line, line
    wait_until(lambda: not _alive_with(mark), 10, "the daemon to end")
    _swept(server)


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return subprocess.run([PY, "-m", "gsrv", "check", "-c", str(path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=30)  # fmt: skip


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"kill_scope": "cgroup"},
            r'\[services.s\] kill_scope is "cgroup", which this host cannot give: '
            r"/tmp/\S+ is not a directory on a cgroup filesystem",
        ),
        (
            {"max_pids": 8},
            r"\[services.s\] max_pids bounds the session's cgroup, and this service has none: "
            r"/tmp/\S+ is not a directory on a cgroup filesystem",
        ),
        ({"max_memory": "64MiB"}, r"\[services.s\] max_memory bounds the session's cgroup"),
        ({"max_cpu": 0.5}, r"\[services.s\] max_cpu bounds the session's cgroup"),
        ({"accounting": True}, r"\[services.s\] accounting counts in the session's cgroup, and this service has none"),
    ],
)
def test_config_errors_on_a_host_without_cgroups(tmp_path, keys, message):
    text = f'[cgroup]\nroot = "{tmp_path}"\n' + service_toml("s", ["cat"], **keys)
    result = _check(tmp_path, text)
    assert result.returncode == 2, result
    assert re.search(message, result.stderr), result.stderr


def test_accounting_with_the_group_kill_scope_is_an_error(tmp_path):
    result = _check(tmp_path, service_toml("s", ["cat"], kill_scope="group", accounting=True))
    assert result.returncode == 2
    assert "[services.s] accounting counts in the session's cgroup, and this service has none: " in result.stderr
    assert 'kill_scope is "group"' in result.stderr


def test_a_limit_needs_its_controller(tmp_path):
    if discover(UNIFIED).mode != "v2":
        pytest.skip("no cgroup v2 hierarchy here")
    result = _check(tmp_path, f'[cgroup]\nroot = "{UNIFIED}"\n' + service_toml("s", ["cat"], max_memory="64MiB"))
    assert result.returncode == 2
    assert "max_memory cannot be enforced on this host: the memory controller is not available" in result.stderr


@needs_cgroups
def test_check_prints_the_mode_and_kill_scopes(tmp_path):
    text = service_toml("a", ["cat"]) + service_toml("b", ["cat"], kill_scope="group", max_sessions=3)
    result = _check(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"cgroup: root=auto mode={HOST.mode} \(", result.stdout), result.stdout
    assert "kill_scope=cgroup (auto)" in result.stdout and "kill_scope=group" in result.stdout


@needs_cgroups
def test_reload_cannot_change_the_root(gsrv, tmp_path):
    server = gsrv(service_toml("cat", ["cat"]))
    text = server.config.read_text()
    server.config.write_text(f'[cgroup]\nroot = "{UNIFIED}"\n' + text)
    server.signal(signal.SIGHUP)
    line = server.wait_log("event=reload_failed")
    assert "[cgroup] root cannot change on reload" in line and 'next="keeping the running config"' in line
    assert _talk(server.address("cat"), b"ok") == b"ok"


@needs_cgroups
def test_metrics_have_each_sessions_cpu_and_peak_memory(gsrv):
    from test_metrics import ADMIN, _admin, _samples, _value

    if not HOST.can("mem_peak"):
        pytest.skip("no memory controller for sessions here")

    burn = py_child("""
        import hashlib
        for _ in range(2000):
            hashlib.sha256(b"x" * 65536).digest()
        print("done")
    """)
    server = gsrv(ADMIN + service_toml("burn", burn, accounting=True))
    base = _admin(server)
    for _ in range(3):
        assert _talk(server.address("burn")) == b"done\n"
    wait_until(lambda: server.count_log("event=session_end") == 3, 10, "3 session_end lines")
    cpu_ms = sum(float(_fields(line)["cpu_ms"]) for line in server.lines if "event=session_end" in line)
    m = _samples(base)
    assert _value(m, "gsrv_session_cpu_seconds_count", service="burn") == 3
    assert _value(m, "gsrv_session_cpu_seconds_sum", service="burn") == pytest.approx(cpu_ms / 1000, rel=0.01)
    assert _value(m, "gsrv_session_memory_peak_bytes_count", service="burn") == 3
    assert _value(m, "gsrv_session_memory_peak_bytes_sum", service="burn") > 3 * 2**20


def test_co_mounted_controllers_share_one_session_cgroup(tmp_path):
    """cpu and cpuacct mounted together (a common v1 layout): one directory, made once."""
    for name in ("freezer", "cpu,cpuacct"):
        (tmp_path / name).mkdir()
    mountinfo = (f"30 23 0:26 / {tmp_path}/freezer rw - cgroup cgroup rw,freezer\n"
                 f"31 23 0:27 / {tmp_path}/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n")  # fmt: skip
    host = discover(mountinfo=mountinfo, cgroup="3:freezer:/\n2:cpu,cpuacct:/\n")
    assert host.mode == "v1" and host.parents["cpu"] == host.parents["cpuacct"] == f"{tmp_path}/cpu,cpuacct"
    root = Root(host)
    assert root.paths == [f"{tmp_path}/freezer/gsrv-{os.getpid()}", f"{tmp_path}/cpu,cpuacct/gsrv-{os.getpid()}"]
    scope = Scope.of(root, "s-1", Limits(cpu=0.5), accounting=True)
    assert scope.paths == [f"{p}/s-1" for p in root.paths]
    assert set(scope.dirs) == {"freezer", "cpu", "cpuacct"}
    assert Scope.shape(root, Limits(cpu=0.5), accounting=True).parents == tuple(root.paths)


@needs_v1
def test_the_spawner_goes_home_with_a_configured_root(gsrv):
    """[cgroup] root given as a path: after its sessions (each in two hierarchies, freezer and
    pids), the spawner is in the cgroups it started in (gsrv's), not in the configured one."""
    name = f"gsrv-test-{os.getpid()}"
    made = [os.path.join(m, name) for m in ("/sys/fs/cgroup/freezer", "/sys/fs/cgroup/pids")]
    for path in made:
        os.mkdir(path)
    try:
        server = gsrv(f'[cgroup]\nroot = "{made[0]}"\n' + service_toml("cat", ["cat"]) + "max_pids = 8\n")
        assert _talk(server.address("cat"), b"x") == b"x"
        spawner = server.spawner_pid()
        before = Path(f"/proc/{server.proc.pid}/cgroup").read_text()
        for _ in range(3):
            assert _talk(server.address("cat"), b"x") == b"x"
        after = Path(f"/proc/{spawner}/cgroup").read_text()
        assert after == before and name not in after, after
        server.stop()
    finally:
        for path in made:
            remove_tree(path)


@needs_v1
def test_a_reload_that_adds_a_limit_applies_it_to_new_sessions(gsrv):
    """Without max_pids a session has no pids cgroup of its own (it is in gsrv's); after a
    reload that adds one, new sessions are held at it."""
    own = py_child("""
        path = [l.split(":")[2] for l in open("/proc/self/cgroup").read().splitlines() if l.split(":")[1] == "pids"]
        print(open(f"/sys/fs/cgroup/pids{path[0]}/pids.max").read().strip() if "/gsrv-" in path[0] else "none")
    """)
    server = gsrv(service_toml("own", own))
    assert _talk(server.address("own")) == b"none\n"
    server.config.write_text(server.config.read_text() + "max_pids = 8\n")
    server.signal(signal.SIGHUP)
    server.wait_log("event=reloaded")
    assert _talk(server.address("own")) == b"8\n"


@needs_cgroups
def test_a_spawn_that_fails_leaves_no_cgroup(gsrv, tmp_path):
    program = tmp_path / "vanishes"
    program.write_text("#!/bin/sh\necho hi\n")
    program.chmod(0o755)
    server = gsrv(service_toml("gone", [str(program)]))
    program.unlink()  # found at load, gone at the spawn
    with server.connect("gone") as sock, contextlib.suppress(ConnectionResetError):
        sock.recv(10)
    server.wait_log("event=session_end service=gone .*reason=spawn_failed")
    _swept(server)


@needs_cgroups
def test_the_ladder_sends_each_process_one_term(gsrv, tmp_path):
    """A child that ignores TERM gets it once (then KILL after kill_grace), as with the group."""
    seen = tmp_path / "terms"
    stubborn = py_child(f"""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: open("{seen}", "a").write("TERM\\n"))
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """)
    server = gsrv(service_toml("stubborn", stubborn, session_timeout="1s"))
    with server.connect("stubborn") as sock:
        assert sock.recv(10) == b"ready\n"
        line = server.wait_log("event=session_end service=stubborn", timeout=20)
    assert "signal=KILL" in line, line
    assert seen.read_text() == "TERM\n"
