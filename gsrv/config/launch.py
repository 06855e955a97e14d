"""How a service's command starts, composed once at load: the argv prefixes in one fixed
order, then the command, and what else its spawn needs (cwd, pipes, containment, a pty). No
shell: each stage is a program that applies one thing and execs the rest (prlimit, setpriv),
so the spawner keeps starting children with posix_spawn.
"""

from __future__ import annotations

from dataclasses import dataclass

from gsrv.config.contain import Containment

# The stages, in the order their prefixes compose. A stage is (name, argv prefix): prlimit
# (as root, so hard limits can be set), setpriv (drops to user/group), setsid --ctty (pty = true: a session
# leader whose controlling terminal is its stdin, before bwrap, whose --new-session would drop
# it), bwrap (the sandbox, as that user).
STAGES = ("rlimits", "privileges", "tty", "sandbox")


@dataclass(frozen=True)
class Launch:
    """argv: every stage's prefix, then the command (argv[0] found at load); executable: what
    is exec'd first (the first stage's tool, or the command); umask: the child's, -1: gsrv's;
    cwd: the child's, None: gsrv's; pipe_size: its pipes' capacity, 0: the kernel's; contain:
    its kill scope, limits and accounting (None: a process group, nothing counted); pty: its
    stdio is a terminal (the tty stage makes it a session leader, not the spawner)."""

    argv: tuple[str, ...]
    executable: str
    stages: tuple[str, ...] = ()
    umask: int = -1
    command_length: int = 0  # the command's own part of argv, at its end
    cwd: str | None = None
    pipe_size: int = 0
    contain: Containment | None = None
    pty: bool = False

    @property
    def prefix(self) -> tuple[str, ...]:
        """The argv before the command (what `gsrv check` prints as via=)."""
        return self.argv[: len(self.argv) - self.command_length]

    @property
    def signal_in_exit(self) -> bool:
        """bwrap reports a command killed by signal N as its own exit 128+N."""
        return "sandbox" in self.stages


def compose(
    command: tuple[str, ...], executable: str, prefixes: dict[str, tuple[str, ...]], umask: int,
    cwd: str | None = None, pipe_size: int = 0, contain: Containment | None = None, pty: bool = False,
) -> Launch:  # fmt: skip
    """The launch of `command` (its argv[0] resolved to `executable`) through the prefixes
    given, in STAGES order; a stage not in STAGES is a bug, not a config error."""
    unknown = set(prefixes) - set(STAGES)
    assert not unknown, f"spawn stages without a place in STAGES: {sorted(unknown)}"
    stages = tuple(stage for stage in STAGES if prefixes.get(stage))
    argv = tuple(part for stage in stages for part in prefixes[stage]) + (executable, *command[1:])
    return Launch(argv, argv[0], stages, umask, len(command), cwd, pipe_size, contain, pty)
