"""`gsrv upgrade --check` (issue 38, being built): the new code's answer before the point of no
return. The running gsrv starts it through its spawner with the state record on an fd; it
imports (this module's own import is that test), reads the record, parses the config the
record names with its overrides, and says whether it can take over: `ok`, exit 0, or why
not, exit 2. It touches none of the fds the record names (they are not its own: it is a
process of its own, and they stay the running gsrv's until the exec).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from gsrv import __version__
from gsrv.config.parse import load
from gsrv.errors import ConfigError
from gsrv.spawn import wire
from gsrv.upgrade.record import VERSION, Record, RecordError, read

ROLES = ("listener:", "admin", "spawner", "guardian", "session:", "idle:")  # what an fd may be taken over as


def check(fd: int, out: TextIO = sys.stdout) -> int:
    """Print `upgrade_check ok ...` and return 0, or `upgrade_check refused: WHY` and return 2."""
    try:
        record = read(fd)
        _can_take(record)
        config = load(record.config, record.overrides)
        _keeps_services(record, {s.name for s in config.services})
        running_root = record.state.get("cgroup_root", config.cgroup.root)
        if config.cgroup.root != running_root:
            raise RecordError(f"{record.config}: [cgroup] root cannot change in an upgrade (running: "
                              f"\"{running_root}\", file: \"{config.cgroup.root}\"): the sessions' cgroups are "
                              "below the running one; restart gsrv to change it")  # fmt: skip
    except (RecordError, ConfigError) as e:
        print(f"upgrade_check refused: {e}", file=out)
        return 2
    took = f"{record.config}: {len(config.services)} service(s)"
    print(f"upgrade_check ok: gsrv {__version__} takes over from gsrv {record.gsrv_version} "
          f"(record version {VERSION}, spawner wire {wire.VERSION}, {took})", file=out)  # fmt: skip
    return 0


def _can_take(record: Record) -> None:
    unknown = sorted(role for role in record.fds if not role.startswith(ROLES))
    if unknown:
        raise RecordError(f"the upgrade record names fds this gsrv cannot take over: {', '.join(unknown)}")
    spawner: Any = record.state.get("spawner", {})
    speaks = spawner.get("wire") if isinstance(spawner, dict) else None
    if speaks != wire.VERSION:
        raise RecordError(f"the running spawner speaks wire version {speaks!r}; this gsrv speaks {wire.VERSION} "
                          "only, and keeps the running spawner (its children stay its own)")  # fmt: skip


def _keeps_services(record: Record, names: set[str]) -> None:
    """Every service with running sessions is in the new config: a session moves into its
    service of the same name (remove a service by a reload, and let it drain, first)."""
    busy = record.state.get("busy_services", [])
    gone = sorted(str(name) for name in busy if name not in names) if isinstance(busy, list) else []
    if gone:
        raise RecordError(f"{record.config} has no service {', '.join(gone)}, which has running sessions: "
                          "keep it in the file until they end")  # fmt: skip
