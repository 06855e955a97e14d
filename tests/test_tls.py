"""TLS termination: real gsrv, real children, stdlib ssl clients with a trustme CA."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from conftest import Gsrv, random_stream, service_toml, wait_until
from test_metrics import ADMIN, _admin, _samples, _value

MiB = 1024 * 1024


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def server_files(ca: trustme.CA, where: Path, name: str = "server") -> dict[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(where / f"{name}.pem"))
    cert.private_key_pem.write_to_path(str(where / f"{name}.key"))
    return {"cert": str(where / f"{name}.pem"), "key": str(where / f"{name}.key")}


def client_context(ca: trustme.CA, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def tls_connect(server: Gsrv, name: str, context: ssl.SSLContext, timeout: float = 30.0) -> ssl.SSLSocket:
    raw = server.connect(name, timeout=timeout)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
def test_a_64_mib_upload_over_tls_reaches_the_child_exactly(
    gsrv: Callable[..., Gsrv], ca: trustme.CA, tmp_path: Path
) -> None:
    server = gsrv(service_toml("up", ["sh", "-c", "head -c 67108864 | sha256sum"], tls=server_files(ca, tmp_path)))
    expected = hashlib.sha256()
    with tls_connect(server, "up", client_context(ca)) as sock:
        for piece in random_stream(64 * MiB, seed=8):
            expected.update(piece)
            sock.sendall(piece)
        reply = read_all(sock)  # ends at gsrv's close_notify
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
    assert reply.split()[0].decode() == expected.hexdigest()
    line = server.wait_log(r"event=session_end service=up")
    assert "bytes_in=67108864" in line and "exit=0" in line and "tls=TLSv1.3" in line and "relay=copy" in line


def _client_hello() -> bytes:
    """The bytes a real client opens its handshake with."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_bad_tls_clients_are_cut_within_the_timeout_and_a_good_one_is_not_delayed(
    gsrv: Callable[..., Gsrv], ca: trustme.CA, tmp_path: Path
) -> None:
    tls = server_files(ca, tmp_path) | {"handshake_timeout": "5s"}
    server = gsrv(ADMIN + service_toml("echo", ["cat"], tls=tls, max_sessions=2))
    hello = _client_hello()
    assert len(hello) > 100
    plain, silent, halfway = (server.connect("echo", timeout=15) for _ in range(3))
    plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
    halfway.sendall(hello[: len(hello) // 2])
    started = time.monotonic()
    ended: dict[str, float] = {}

    def watch(name: str, sock: socket.socket) -> None:
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        ended[name] = time.monotonic() - started

    watchers = [threading.Thread(target=watch, args=item) for item in
                (("plain", plain), ("silent", silent), ("halfway", halfway))]  # fmt: skip
    for w in watchers:
        w.start()
    with tls_connect(server, "echo", client_context(ca), timeout=10) as good:
        good.sendall(b"hello over tls\n")
        assert good.recv(100) == b"hello over tls\n"
    stalled = {"silent", "halfway"} - set(ended)  # still waiting when the good session was done
    pending = _value(_samples(_admin(server)), "gsrv_pending", service="echo")
    for w in watchers:
        w.join(timeout=20)
    for sock in (plain, silent, halfway):
        sock.close()
    # The good session ran while two handshakes were stalled: no slot or loop time was theirs.
    assert stalled == {"silent", "halfway"}, ended
    assert pending == 2  # the two stalled handshakes, neither holding one of the 2 session slots
    assert ended["plain"] < min(ended["silent"], ended["halfway"]), ended  # not TLS: refused at its first bytes
    for name in ("silent", "halfway"):
        assert ended[name] > 4, ended  # handshake_timeout is 5s (counted from an accept before `started`)
    # Closed without close_notify: for TLS that is a truncation, not the end of input.
    server.wait_log(r"event=session_end service=echo .*tls=TLSv1.3.*reason=client_reset")
    wait_until(lambda: server.count_log(r"reason=tls_failed") == 3, 5, "three tls_failed lines")
    assert server.count_log(r"reason=tls_failed error=.*within 5s") == 2
    assert not server.children()
    assert _value(_samples(_admin(server)), "gsrv_pending", service="echo") == 0


def test_a_verified_client_certificate_reaches_the_child_and_a_missing_one_is_refused(
    gsrv: Callable[..., Gsrv], ca: trustme.CA, tmp_path: Path
) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = server_files(ca, tmp_path) | {"client_ca": str(tmp_path / "ca.pem")}
    names = ("SSL_CLIENT_S_DN", "SSL_CLIENT_I_DN", "SSL_CLIENT_VERIFY", "SSL_PROTOCOL", "SSL_CIPHER")
    show = 'printf "%s|%s|%s|%s|%s" ' + " ".join(f'"${name}"' for name in names)
    server = gsrv(service_toml("who", ["sh", "-c", show], tls=tls))
    context = client_context(ca)
    ca.issue_cert("alice@example.org", common_name="alice").configure_cert(context)
    with tls_connect(server, "who", context) as sock:
        subject, issuer, verify, protocol, cipher = read_all(sock).decode().split("|")
    assert subject.startswith("CN=alice") and verify == "SUCCESS", subject
    assert "O=trustme" in issuer
    assert protocol == "TLSv1.3" and cipher.startswith("TLS_")
    anonymous = client_context(ca)
    with tls_connect(server, "who", anonymous) as sock, pytest.raises((ssl.SSLError, OSError)):
        read_all(sock)  # TLS 1.3: the server's refusal shows on the first read
    server.wait_log(r"reason=tls_failed error=.*CERTIFICATE")


def test_without_a_client_ca_the_child_gets_protocol_and_cipher_only(
    gsrv: Callable[..., Gsrv], ca: trustme.CA, tmp_path: Path
) -> None:
    server = gsrv(service_toml("who", ["env"], tls=server_files(ca, tmp_path)))
    with tls_connect(server, "who", client_context(ca, ssl.TLSVersion.TLSv1_2)) as sock:
        env = dict(line.split("=", 1) for line in read_all(sock).decode().splitlines() if "=" in line)
    assert env["SSL_PROTOCOL"] == "TLSv1.2" and env["SSL_CIPHER"]
    assert not any(k.startswith("SSL_CLIENT_") for k in env)
    assert env["TCPREMOTEIP"] == "127.0.0.1"


def test_tls_1_1_is_refused(gsrv: Callable[..., Gsrv], ca: trustme.CA, tmp_path: Path) -> None:
    server = gsrv(service_toml("echo", ["cat"], tls=server_files(ca, tmp_path)))
    context = client_context(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, OSError)):
        tls_connect(server, "echo", context, timeout=10)
    server.wait_log(r"reason=tls_failed")


class MemoryClient:
    """A TLS client over memory BIOs, so it can send close_notify and keep reading (the
    stdlib's SSLSocket.unwrap() waits for the server's close_notify before returning)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock, self.incoming, self.outgoing = sock, ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self._call(self.obj.do_handshake)

    def _call(self, op: Callable[[], object]) -> object:
        while True:
            try:
                result = op()
                self._flush()
                return result
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    self.incoming.write_eof()
                else:
                    self.incoming.write(data)

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.unwrap()
        self._flush()

    def read_all(self) -> bytes:
        chunks = []
        while True:
            try:
                data = self._call(lambda: self.obj.read(65536))
            except ssl.SSLZeroReturnError:
                return b"".join(chunks)
            if not data:
                return b"".join(chunks)
            chunks.append(data)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_the_clients_close_notify_ends_input_and_output_after_it_reaches_only_tls_1_3(
    gsrv: Callable[..., Gsrv], ca: trustme.CA, tmp_path: Path, version: str
) -> None:
    server = gsrv(service_toml("count", ["wc", "-c"], tls=server_files(ca, tmp_path)))
    with server.connect("count") as raw:
        client = MemoryClient(raw, client_context(ca, getattr(ssl.TLSVersion, version.replace(".", "_"))))
        client.send(b"x" * 100_000)
        client.close_notify()
        reply = client.read_all()  # ends at gsrv's close_notify
    line = server.wait_log(r"event=session_end service=count")
    assert "bytes_in=100000" in line and "exit=0" in line, line
    if version == "TLSv1.3":
        assert reply.strip() == b"100000"
        assert "bytes_out=7" in line
    else:  # RFC 5246: a close_notify closes both directions; gsrv answered it at once
        assert reply == b""
        assert "bytes_out=0" in line


def test_certificates_reload_on_sighup(gsrv: Callable[..., Gsrv], tmp_path: Path) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    files = server_files(old_ca, tmp_path)
    server = gsrv(service_toml("echo", ["cat"], tls=files))
    with tls_connect(server, "echo", client_context(old_ca)) as sock:
        sock.sendall(b"one")
        assert sock.recv(10) == b"one"
        server_files(new_ca, tmp_path)  # the same paths, a new certificate
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_log(r"event=reloaded", start=mark)
        sock.sendall(b"two")  # the running session keeps its TLS session
        assert sock.recv(10) == b"two"
    with tls_connect(server, "echo", client_context(new_ca)) as sock:
        sock.sendall(b"three")
        assert sock.recv(10) == b"three"
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_connect(server, "echo", client_context(old_ca))
    # A reload that cannot read the key keeps the certificates in use.
    Path(files["key"]).write_text("not a key")
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    failed = server.wait_log(r"event=reload_failed", start=mark)
    assert "[services.echo.tls] key" in failed, failed
    with tls_connect(server, "echo", client_context(new_ca)) as sock:
        sock.sendall(b"four")
        assert sock.recv(10) == b"four"


def test_max_pending_makes_accept_wait_and_per_ip_limits_count_handshakes(
    gsrv: Callable[..., Gsrv], ca: trustme.CA, tmp_path: Path
) -> None:
    tls = server_files(ca, tmp_path) | {"handshake_timeout": "20s"}
    server = gsrv(ADMIN + service_toml("echo", ["cat"], tls=tls, max_pending=2, max_sessions_per_ip=1))
    admin = _admin(server)
    addr = server.address("echo")
    silent = [socket.create_connection(addr, timeout=20, source_address=(f"127.0.0.{n}", 0)) for n in (2, 3)]
    pending = lambda: _value(_samples(admin), "gsrv_pending", service="echo")  # noqa: E731
    wait_until(lambda: pending() == 2, 10, "two handshakes pending")  # the gate is now full
    done: list[bytes] = []

    def good() -> None:
        raw = socket.create_connection(addr, timeout=20, source_address=("127.0.0.4", 0))
        with client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"in the end")
            done.append(sock.recv(100))

    waiting = threading.Thread(target=good)
    waiting.start()
    waiting.join(timeout=1.5)
    assert not done and waiting.is_alive(), "the third connection was accepted past max_pending"
    silent[0].close()  # one handshake gives up: its place is free
    waiting.join(timeout=10)
    assert done == [b"in the end"]
    # 127.0.0.3 still has a handshake pending: a second connection from it is over its limit
    with socket.create_connection(addr, timeout=10, source_address=("127.0.0.3", 0)) as again:
        assert again.recv(100) == b""
    server.wait_log(r"peer=127\.0\.0\.3:\d+ .*reason=per_ip_limit")
    silent[1].close()


def test_a_drain_ends_pending_handshakes_with_reason_shutdown(
    gsrv: Callable[..., Gsrv], ca: trustme.CA, tmp_path: Path
) -> None:
    tls = server_files(ca, tmp_path) | {"handshake_timeout": "60s"}
    server = gsrv(ADMIN + service_toml("echo", ["cat"], tls=tls))
    admin = _admin(server)
    silent = server.connect("echo")
    wait_until(lambda: _value(_samples(admin), "gsrv_pending", service="echo") == 1, 10, "a pending handshake")
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=20) == 0
    server.close()
    assert server.count_log(r"event=session_end service=echo .*reason=shutdown") == 1
    silent.close()
