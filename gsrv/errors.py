"""Error types shared across gsrv.

ConfigError carries the file and key so every message can name both.
"""

from __future__ import annotations

import errno

# Errors that mean "out of fds or memory right now": worth waiting for, not the client's fault.
RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN)


class GsrvError(Exception):
    """Base class for errors gsrv reports to a person."""


class ConfigError(GsrvError):
    """A config file that cannot be used: names the file, the key and the problem."""

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file = file
        self.key = key
        self.message = message
        where = f"{file}: {key} " if key else f"{file}: "
        super().__init__(where + message)


class SpawnError(GsrvError):
    """The command of a session could not be started; errno says whether resources ran out."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
