"""Which spawner starts the sessions' children (`[server] spawner`): the compiled one the
package's build made beside gsrv/spawn/spawner.py (gsrv/spawn/spawner.c), where it may be
trusted, else the Python one. Both speak the same wire (gsrv/spawn/wire.py)."""

from __future__ import annotations

import os
import stat

C_SPAWNER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spawn", "gsrv-spawner")
CHOICES = ("auto", "c", "python")


def c_spawner_problem(path: str = C_SPAWNER) -> str | None:
    """Why the compiled spawner cannot run, or None: a regular executable file, root's or
    gsrv's own user's, that neither its group nor anyone else may write."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} was not built (the package's build compiles it when a C compiler is there)"
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        return f"{path} is not an executable file"
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} belongs to uid {st.st_uid}, neither root nor gsrv's user"
    if st.st_mode & 0o022:
        return f"{path} may be written by its group or by anyone (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def chosen(choice: str) -> tuple[str, str | None]:
    """The spawner that runs for this choice ("c" or "python"), and for "auto" why not the
    compiled one when it cannot be (a "c" that cannot is a config error: parse checks it)."""
    if choice == "python":
        return "python", None
    problem = c_spawner_problem()
    return ("python", problem) if problem else ("c", None)
