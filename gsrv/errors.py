"""Error types shared across gsrv.

ConfigError carries the file and key so every message can name both.
"""

from __future__ import annotations


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
    """The command of a session could not be started."""
