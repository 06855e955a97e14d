"""systemd's readiness protocol (sd_notify(3)) for `Type=notify`: READY=1 once the listeners
are open (serving, or paused by the memory guard: clients wait in the backlog), STOPPING=1
when a stop begins, STATUS= with the state. Nothing without NOTIFY_SOCKET.

One datagram per change, sent without blocking: a full receiver queue loses that message
(logged), never stalls the server.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from gsrv.logs import Log
from gsrv.state import State

STOPPING = (State.ANNOUNCING, State.DRAINING, State.STOPPED)


def _address(value: str) -> str:
    """NOTIFY_SOCKET names a path, or an abstract socket with a leading "@"."""
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    def __init__(self, address: str, log: Log) -> None:
        self.address, self.log = address, log
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.ready = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], log: Log) -> Notifier | None:
        value = environ.get("NOTIFY_SOCKET", "")
        return cls(_address(value), log) if value else None

    def changed(self, state: State) -> None:
        """A Lifecycle observer: what systemd should know of the new state."""
        fields = {"STATUS": state.value}
        if state in (State.SERVING, State.PAUSED) and not self.ready:
            self.ready = True
            fields |= {"READY": "1", "MAINPID": str(os.getpid())}
        elif state in STOPPING:
            fields["STOPPING"] = "1"
        self.send(fields)

    def send(self, fields: dict[str, str]) -> None:
        message = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
        try:
            self.sock.sendto(message, self.address)
        except OSError as e:
            self.log.warning("notify_failed", error=e.strerror or str(e), message=message.decode().strip(),
                             next="systemd misses this state; check NOTIFY_SOCKET")  # fmt: skip

    def close(self) -> None:
        self.sock.close()
