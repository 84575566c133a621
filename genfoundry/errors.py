"""Exception types for mistakes in what the user asked for or gave."""

import os
from pathlib import Path


class GenfoundryError(ValueError):
    """A mistake in what the user asked for or gave (an option, a config value, a file, a dataset).

    Its message is one line that the CLI prints without a traceback. It stays a ValueError so that
    Python callers catching ValueError keep working.
    """


class ConfigError(GenfoundryError):
    """A bad value in a recipe, an override or a command-line option; the message is one line a user understands."""


def writable_directory(path, error: type[GenfoundryError] = GenfoundryError) -> Path:
    """`path` as a directory, created if needed, or `error` naming it when it cannot be created or written."""
    path = Path(os.path.expanduser(path))
    if path.exists() and not path.is_dir():
        raise error(f"output '{path}' exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create output directory '{path}': {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise error(f"output directory '{path}' is not writable")
    return path
