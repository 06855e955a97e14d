"""The keys of a service that shape how its client and its command talk: a pseudo-terminal
for interactive programs (`pty`), and what follows from it for the other keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gsrv.config import keys
from gsrv.config.keys import key
from gsrv.config.policy import util_linux
from gsrv.config.table import Table

TERM = "xterm-256color"  # the child's TERM on a pty unless the service's env sets one


@dataclass(frozen=True)
class Interaction:
    """Keys of a [services.NAME] table, like Policy's and Containment's."""

    pty: bool = key(keys.flag(), False, "the child's stdin, stdout and stderr are a new pseudo-terminal, its "
                    "controlling terminal (TERM from env, default xterm-256color; stderr defaults to \"stdout\": "
                    "the terminal)", shown=True)  # fmt: skip
    stages: tuple[tuple[str, tuple[str, ...]], ...] = ()  # derived: the tty stage (setsid --ctty)


def parse_interaction(t: Table, values: dict[str, Any], environ: dict[str, str]) -> Interaction:
    """The keys, checked against the service's other keys (`values`, which a pty's defaults
    for stderr and TERM amend)."""
    found = keys.read_all(t, Interaction)
    if not found["pty"]:
        return Interaction(**found)
    relay = values["relay"]
    if relay in ("splice", "socket"):
        what = "needs pipes" if relay == "splice" else "gives the child the connection itself"
        raise t.fail("relay", f'is "{relay}", which {what}: with pty = true gsrv copies to and from the '
                     'terminal (use relay = "auto" or "copy")')  # fmt: skip
    if "pipe_size" in t.data:
        raise t.fail("pipe_size", "sizes the stdin and stdout pipes, which a pty replaces (remove the key)")
    if "stderr" not in t.data:
        values["stderr"] = "stdout"
    if not any(name == "TERM" for name, _ in values["env"]):
        values["env"] = (*values["env"], ("TERM", TERM))
    # In place (not a group leader: gsrv spawns a pty child in its own group), a session leader
    # whose controlling terminal is its stdin; it execs the rest.
    return Interaction(**found, stages=(("tty", (util_linux(t, "pty", "setsid", environ), "--ctty")),))
