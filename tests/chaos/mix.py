"""The chaos mix: misbehaving clients and children, each kind on a service of its own, and
the reason the log must give for each session. Used by tests/chaos and bench/soak.py.

Every client returns an Outcome naming its local port, so the audit can find the session's
log line (peer=127.0.0.1:PORT) and check the reason, and whether its bytes were exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MARK = "41.37"  # the orphaned grandchild's sleep: unique, so the audit can look for leftovers
SLOW_BYTES = 100 * 1000 * 1000
SLOW_RATE = 64 * 1024  # bytes/s a slow downloader reads

# service -> (command, extra keys, the reasons its sessions may end with)
CRASH = "n=${GSRV_SESSION##*-}; head -c $(( n * 7919 % 524288 )) >/dev/null; kill -KILL $$"
SERVICES: dict[str, tuple[list[str], dict[str, object], tuple[str, ...]]] = {
    "up": (["sha256sum"], {}, ("eof",)),  # fast uploaders
    "slow": (["head", "-c", str(SLOW_BYTES), "/dev/zero"], {}, ("client_reset",)),  # read slowly, then reset
    # never reads its input: "eof" when all of it (and the client's EOF) fit in the kernel's buffers
    "deaf": (["sleep", "1"], {}, ("child_exit", "eof")),
    # dies by SIGKILL after a pseudo-random amount of input (from its session number)
    "crash": (["sh", "-c", CRASH], {}, ("child_exit",)),
    "echo": (["cat"], {}, ("client_reset",)),  # the client resets at a random point
    "idle": (["cat"], {"idle_timeout": "1s"}, ("idle_timeout",)),  # the client sends nothing
    "stubborn": (["sh", "-c", 'trap "" TERM; sleep 5'], {"session_timeout": "1s"}, ("session_timeout",)),
    "orphan": (["sh", "-c", f"sleep {MARK} & echo hi"], {}, ("child_exit",)),  # a grandchild keeps stdout open
}


@dataclass
class Outcome:
    service: str
    port: int  # the client's own port: the session's log line says peer=127.0.0.1:PORT
    ok: bool  # the bytes it got were exactly right (for the kinds that check bytes)
    detail: str = ""
    started: float = 0.0  # ports are reused over a long run: one port's sessions, in order


def services_toml(**common: object) -> str:
    """Every service of the mix; `common` keys (like max_sessions) go into each."""
    from conftest import service_toml  # tests/ is on sys.path for the suite and for bench/soak.py

    return "".join(service_toml(name, command, **keys, **common) for name, (command, keys, _) in SERVICES.items())


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _read_all(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything until EOF; and False if it ended with a reset instead."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        return b"".join(chunks), False
    return b"".join(chunks), True


def _send_in_background(sock: socket.socket, data: bytes, half_close: bool) -> threading.Thread:
    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def up(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    data = rng.randbytes(rng.randint(0, 2 * 1024 * 1024))
    sender = _send_in_background(sock, data, half_close=True)
    reply, clean = _read_all(sock)
    sender.join(30)
    return clean and reply == f"{hashlib.sha256(data).hexdigest()}  -\n".encode(), f"{len(data)} bytes"


def slow(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    until = time.monotonic() + rng.uniform(0.5, 3.0)
    got = 0
    exact = True
    while time.monotonic() < until:
        chunk = sock.recv(SLOW_RATE // 10)
        if not chunk:
            return False, "ended early"
        exact = exact and chunk.count(0) == len(chunk)
        got += len(chunk)
        time.sleep(0.1)
    _reset(sock)
    return exact and got > 0, f"{got} bytes"


def deaf(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    sender = _send_in_background(sock, b"x" * 256 * 1024, half_close=True)
    reply, clean = _read_all(sock)
    sender.join(30)
    return clean and reply == b"", "FIN" if clean else "reset"


def crash(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    sender = _send_in_background(sock, b"y" * 4 * 1024 * 1024, half_close=True)
    reply, clean = _read_all(sock)
    sender.join(30)
    # Killed: gsrv resets; but the sending thread may take the reset, and then recv() sees an EOF.
    return reply == b"", "reset" if not clean else "FIN or reset"


def echo(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    data = rng.randbytes(rng.randint(1, 512 * 1024))
    cut = rng.randint(0, len(data))
    sender = _send_in_background(sock, data, half_close=False)
    got = b""
    while len(got) < cut:
        chunk = sock.recv(min(65536, cut - len(got)))
        if not chunk:
            break
        got += chunk
    _reset(sock)  # mid-stream, at a random point
    sender.join(30)
    return got == data[: len(got)] and len(got) == cut, f"{cut} of {len(data)} bytes"


def idle(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    reply, clean = _read_all(sock)
    return reply == b"" and not clean, "reset" if not clean else "FIN"


def stubborn(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    reply, clean = _read_all(sock)
    return reply == b"" and not clean, "reset" if not clean else "FIN"


def orphan(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    sock.shutdown(socket.SHUT_WR)
    reply, clean = _read_all(sock)
    return clean and reply == b"hi\n", repr(reply[:20])


CLIENTS: dict[str, Callable[[socket.socket, random.Random], tuple[bool, str]]] = {
    "up": up, "slow": slow, "deaf": deaf, "crash": crash, "echo": echo, "idle": idle, "stubborn": stubborn,
    "orphan": orphan,
}  # fmt: skip


def one(address: tuple[str, int], service: str, rng: random.Random, timeout: float = 60.0) -> Outcome:
    started = time.monotonic()
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as e:
        return Outcome(service, 0, False, f"connect: {e}", started)
    port = sock.getsockname()[1]
    try:
        ok, detail = CLIENTS[service](sock, rng)
    except OSError as e:
        ok, detail = False, f"{type(e).__name__}: {e}"
    finally:
        sock.close()
    return Outcome(service, port, ok, detail, started)


def run(
    address_of: Callable[[str], tuple[str, int]], duration: float, workers: int = 24, seed: int = 1
) -> list[Outcome]:
    """Clients of every kind, picked at random, `workers` at a time, starting new ones for
    `duration` seconds; returns every outcome once all have ended."""
    deadline = time.monotonic() + duration
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        while time.monotonic() < deadline:
            service = rng.choice(list(SERVICES))
            outcome = one(address_of(service), service, rng)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 120)
    return outcomes
