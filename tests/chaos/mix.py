"""The chaos mix: misbehaving clients and children, each kind on a service of its own, and
the reason the log must give for each session. Used by tests/chaos and bench/soak.py.

Every client returns an Outcome naming its local port, so the audit can find the session's
log line (peer=127.0.0.1:PORT) and check the reason, and whether its bytes were exact. The
PROXY clients name their own address in the header, so the line's peer is theirs too. The
TLS services need `prepare(folder)` first (a trustme CA and certificate).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MARK = "41.37"  # the orphaned grandchild's sleep: unique, so the audit can look for leftovers
SLOW_BYTES = 100 * 1000 * 1000
SLOW_RATE = 64 * 1024  # bytes/s a slow downloader reads
TLS_BYTES = 262144
PROXIED: dict[str, object] = {"proxy_protocol": "v2", "proxy_trusted": ["127.0.0.1"], "proxy_timeout": "1s"}

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
    # TLS: a whole upload (the child ends its input itself), and handshakes that stall halfway
    "tls_up": (["sh", "-c", f"head -c {TLS_BYTES} | sha256sum"], {"tls": "TLS"}, ("child_exit",)),
    "tls_stall": (["cat"], {"tls": "TLS"}, ("tls_failed",)),
    # PROXY v2 from a trusted peer naming the client, and garbage instead of a header
    "proxied": (["sh", "-c", 'echo "$TCPREMOTEIP:$TCPREMOTEPORT"; exec cat'], PROXIED, ("eof",)),
    "bad_proxy": (["cat"], PROXIED, ("proxy_failed",)),
    # a terminal in canonical mode: lines in, the EOF character at the client's EOF, ONLCR out
    "pty": (["sh", "-c", "stty -echo; echo ready; exec cat"], {"pty": True}, ("eof",)),
    # WebSocket text messages (websockets, an independent client) through cat, closed by the client
    "websocket": (["cat"], {"transport": "websocket"}, ("eof",)),
}
_tls: dict[str, object] = {}  # "files": {cert, key}, "context": a client SSLContext trusting the CA


def prepare(folder: Path) -> None:
    """Make the TLS services' certificate (trustme) in folder."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(folder / "mix.pem"))
    cert.private_key_pem.write_to_path(str(folder / "mix.key"))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    _tls.update(files={"cert": str(folder / "mix.pem"), "key": str(folder / "mix.key"),
                       "handshake_timeout": "1s"}, context=context)  # fmt: skip


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

    assert _tls, "call prepare(folder) first: the TLS services need a certificate"
    return "".join(
        service_toml(name, command, **{k: _tls["files"] if v == "TLS" else v for k, v in keys.items()}, **common)
        for name, (command, keys, _) in SERVICES.items()
    )


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


def tls_up(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    context = _tls["context"]
    assert isinstance(context, ssl.SSLContext)
    data = rng.randbytes(TLS_BYTES)
    with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(data)
        reply, clean = _read_all(tls)  # ends at gsrv's close_notify
    return clean and reply == f"{hashlib.sha256(data).hexdigest()}  -\n".encode(), "TLS upload"


def tls_stall(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    sock.sendall(hello[: rng.randint(0, len(hello) - 1)])  # part of a real ClientHello, then nothing
    reply, _ = _read_all(sock)  # until gsrv gives up on it
    return reply == b"", "stalled handshake"


def _v2_header(client: tuple[str, int]) -> bytes:
    body = socket.inet_aton(client[0]) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", client[1], 7000)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def proxied(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    port = sock.getsockname()[1]  # the header names the client's own port: the audit's key
    data = rng.randbytes(rng.randint(0, 256 * 1024))
    sender = _send_in_background(sock, _v2_header(("198.51.100.7", port)) + data, half_close=True)
    reply, clean = _read_all(sock)
    sender.join(30)
    return clean and reply == f"198.51.100.7:{port}\n".encode() + data, f"{len(data)} bytes"


def bad_proxy(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    with contextlib.suppress(OSError):
        sock.sendall(rng.choice([b"GET / HTTP/1.0\r\n\r\n", b"PROXY TCP4 1.2.3.4\r\n", b"\r\n\r\n\x00\r\nQUIT\n\x99"]))
    reply, _ = _read_all(sock)
    return reply == b"", "refused"


def pty(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    got = b""
    while not got.endswith(b"ready\r\n"):  # echo is off from here on
        chunk = sock.recv(100)
        if not chunk:
            return False, f"no ready mark: {got!r}"
        got += chunk
    printable = bytes(range(32, 127))
    lines = [bytes(rng.choice(printable) for _ in range(rng.randint(0, 200))) for _ in range(rng.randint(1, 300))]
    data = b"\n".join(lines) + rng.choice([b"\n", b""])  # a partial last line: two EOF characters end it
    sender = _send_in_background(sock, data, half_close=True)
    reply, clean = _read_all(sock)
    sender.join(30)
    return clean and reply == data.replace(b"\n", b"\r\n"), f"{len(lines)} lines"


def websocket(sock: socket.socket, rng: random.Random) -> tuple[bool, str]:
    from websockets.sync.client import connect

    host, port = sock.getpeername()[:2]
    lines = [rng.randbytes(rng.randint(0, 3000)).hex() for _ in range(rng.randint(1, 50))]
    got = []
    with connect(f"ws://{host}:{port}/", sock=sock, open_timeout=30, close_timeout=30) as ws:
        for line in lines:  # one at a time: the sync client cannot read while a send blocks
            ws.send(line)
            got.append(ws.recv(timeout=30))
        ws.close()
        code = ws.close_code
    return got == lines and code == 1000, f"{len(lines)} messages, close {code}"


CLIENTS: dict[str, Callable[[socket.socket, random.Random], tuple[bool, str]]] = {
    "up": up, "slow": slow, "deaf": deaf, "crash": crash, "echo": echo, "idle": idle, "stubborn": stubborn,
    "orphan": orphan, "tls_up": tls_up, "tls_stall": tls_stall, "proxied": proxied, "bad_proxy": bad_proxy,
    "pty": pty, "websocket": websocket,
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
