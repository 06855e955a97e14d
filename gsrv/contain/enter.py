"""The v2 placement helper, first in a session's argv: `python -S enter.py CGROUP_DIR ARGV...`.

It writes its own pid into the session cgroup's cgroup.procs and then execs the rest of the
argv (the next stage or the command), so nothing of the session runs outside its cgroup. v2
places whole processes only, and CPython gives no clone3(CLONE_INTO_CGROUP): this is the
step a spawn with vfork cannot do itself. Imports only os and sys (it starts with -S).
"""

import os
import sys

SLOT = "{cgroup}"  # where config/launch.py puts the session's cgroup directory
FAILED = 125  # the exit status when the cgroup cannot be entered: the command never ran


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.stderr.write("usage: enter.py CGROUP_DIR ARGV...\n")
        return FAILED
    target, command = argv[1], argv[2:]
    try:
        fd = os.open(os.path.join(target, "cgroup.procs"), os.O_WRONLY)
        try:
            os.write(fd, b"0")  # "0": the writing process itself
        finally:
            os.close(fd)
        os.execv(command[0], command)
    except OSError as e:
        sys.stderr.write(f"gsrv: cannot start the session in {target}: {e.strerror} ({command[0]})\n")
    return FAILED


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
