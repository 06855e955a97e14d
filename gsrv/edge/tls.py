"""TLS termination over memory BIOs: gsrv does the socket I/O, OpenSSL only the records.

With the records in memory gsrv decides every wait itself: the handshake runs under the
service's handshake_timeout, sending our close_notify never waits for the client's, and
the pumps stay bounded (one record in, one chunk out). The two pumps of a session share
one TlsStream; the outgoing records are sent under a lock so they never interleave.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from typing import Any

from gevent.lock import Semaphore
from gevent.socket import socket

FILL = 64 * 1024  # encrypted bytes read from the socket at a time (about four records)


class TlsStream:
    """A server-side TLS session on a connected gevent socket."""

    def __init__(self, sock: socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._in, self._out, server_side=True)
        self._sending = Semaphore()
        self.closed = False  # ours was sent (TLS 1.2: at the client's; else at the end of output)
        self.torn = False  # a send stopped inside a record: nothing more can follow it
        self.version = ""  # once the handshake is done: "TLSv1.3" or "TLSv1.2"

    def handshake(self) -> None:
        """Raises ssl.SSLError or OSError; the caller bounds it with a Timeout."""
        while True:
            try:
                self.obj.do_handshake()
                self.version = self.obj.version() or ""
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    self._flush()  # the alert that tells the client why
                raise

    def recv(self, size: int) -> bytes:
        """Plain bytes from the client; b"" after its close_notify. Raises ssl.SSLError on a
        close without close_notify (a truncation the child must not take for the end)."""
        while True:
            try:
                data = self.obj.read(size)
                break
            except ssl.SSLWantReadError:
                self._flush()  # TLS 1.3 may owe the client a record (a KeyUpdate reply)
                self._fill()
            except ssl.SSLZeroReturnError:  # (read() returns b"" instead until ours was sent)
                data = b""
                break
        if not data:
            if self.version != "TLSv1.3":  # RFC 5246 7.2.1: answer it, and stop writing
                self.close_notify()
            return data
        parts, got = [data], len(data)
        while got < size and self._in.pending:  # records already read: take them too (fewer writes)
            try:
                more = self.obj.read(size - got)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break  # a partial record, or the close_notify: the next call sees it
            if not more:
                break
            parts.append(more)
            got += len(more)
        return data if len(parts) == 1 else b"".join(parts)

    @property
    def buffered(self) -> bool:
        """Bytes of the client's already read from the socket, not yet taken by recv (the
        socket may not be readable while they wait here)."""
        return bool(self._in.pending or self.obj.pending())

    def send(self, data: bytes | bytearray | memoryview) -> float:
        """Encrypt and send all of data; the seconds spent waiting for the client."""
        self.obj.write(data)
        return self._flush()

    def close_notify(self) -> None:
        """Send our close_notify; never waits for the client's."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError too: we never wait for theirs
            self.obj.unwrap()
        with contextlib.suppress(OSError):
            self._flush()

    def env(self) -> dict[str, str]:
        """What the child is told of the TLS session, as mod_ssl and stunnel name it."""
        env = {"SSL_PROTOCOL": self.version, "SSL_CIPHER": (self.obj.cipher() or ("",))[0]}
        cert = self.obj.getpeercert()
        if cert:
            env |= {"SSL_CLIENT_S_DN": _dn(cert.get("subject", ())), "SSL_CLIENT_I_DN": _dn(cert.get("issuer", ())),
                    "SSL_CLIENT_VERIFY": "SUCCESS"}  # fmt: skip
        return env

    def _fill(self) -> None:
        data = self.sock.recv(FILL)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def _flush(self) -> float:
        waited = 0.0
        with self._sending:
            while self._out.pending:
                data = self._out.read()
                started = time.monotonic()
                try:
                    self.sock.sendall(data)
                except BaseException:  # records taken from the BIO and not all sent: for good
                    self.torn = True
                    raise
                waited += time.monotonic() - started
        return waited


def _dn(rdns: Any) -> str:
    """A distinguished name in RFC 4514 order and syntax, like "CN=client,O=Example"."""
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
             "stateOrProvinceName": "ST", "localityName": "L", "emailAddress": "emailAddress"}  # fmt: skip
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{names.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out
