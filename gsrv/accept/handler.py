"""What a gate asks of its service (`Handler`), in a connection's order, and the types it carries."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

ENDED = -1  # Handler.spawned: the session ended without a command

C = TypeVar("C")  # a connection accepted, not yet a session
S = TypeVar("S")  # a running session


class Handler(Protocol[C, S]):
    """What a gate asks of its service, in a connection's order (trio's serve_listeners takes
    one handler the same way)."""

    @property
    def has_prelude(self) -> bool:
        """Whether connections run `prelude` (a PROXY header, a TLS handshake) before a slot."""

    def arrive(self, sock: Any, address: Any) -> C | None:
        """At accept, without yielding: the connection, or None when a rule refused it."""

    def prelude(self, conn: C) -> C | None:
        """In its own greenlet, no slot held: the connection with what its prelude found (what
        start() takes), or None when the connection is not this gate's any more (refused, or
        handed to a running session)."""

    def start(self, conn: C) -> S | int | None:
        """Ask for its command without yielding: the session; an errno when fds or memory ran
        out (the connection is kept, to try again); None when it ended the connection."""

    def spawned(self, session: S) -> int | None:
        """Wait until its command started: None when it runs; an errno as start() gives; ENDED
        when the session ended (its command could not start)."""

    def run(self, session: S) -> None:
        """The session until its child is reaped; its slot frees when this returns."""

    def drop(self, conn: C, reason: str, error: str | None = None) -> None:
        """End a connection that never became a session (a drain, a prelude that raised)."""

    def busy(self, conn: C) -> None:
        """In its own greenlet: the busy answer (queue_timeout passed, or a pause that answers),
        and the connection ends."""
