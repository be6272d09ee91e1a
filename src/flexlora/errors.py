"""The errors a user sees as one line (exit code 2): a leaf module, so that any module can raise
them without importing the configuration or the data layer."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


class DataError(ValueError):
    """Unusable input data; the one-line message names the file (and line) and the problem."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path, self.line, self.reason = path, line, message
        where = f"{path}:{line}: " if path and line is not None else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}")


def one_line(e: BaseException) -> str:
    """'Type: first line of the message': a library's exception, quoted inside one of ours."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
