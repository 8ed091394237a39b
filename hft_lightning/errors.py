"""The error type for mistakes in a run's configuration or data.

Every check on user input raises :class:`ConfigError` (a ``ValueError``) naming the field, the file or the
flag, before training starts. The command line prints such an error as one line and exits with status 2,
the way argparse reports a bad flag; any other exception keeps its traceback, since it is a bug.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A mistake in the configuration or the data of a run, named precisely enough to fix it."""


def find_config_error(error: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` that caused ``error`` (libraries such as jsonargparse wrap it), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
