"""Exceptions that the command line turns into one-line messages (no traceback)."""

from __future__ import annotations


class GceError(Exception):
    """Base class for errors caused by the user's input, data, configuration or environment."""


class DatasetError(GceError):
    """A dataset root, index file or image is missing or malformed."""


class BadImageError(DatasetError):
    """An image file cannot be decoded. The message names the file and the problem."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        if reason is None:
            # A DataLoader worker re-raises with one argument, the formatted traceback
            # (torch's ExceptionWrapper.reraise); recover "path: reason" from its last line.
            path, reason = _parse_worker_message(path)
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep path/reason when raised inside a DataLoader worker
        return (type(self), (self.path, self.reason))


def _parse_worker_message(message: str) -> tuple[str, str]:
    """Split a DataLoader worker's traceback text back into the original ``(path, reason)``."""
    marker = "BadImageError: "
    last = message[message.rfind(marker) + len(marker) :] if marker in message else message
    path, sep, reason = last.strip().partition(": ")
    return (path, reason) if sep else (last.strip(), "unreadable image")


class ConfigError(GceError):
    """A configuration key is unknown or has a bad value. The message names the key."""


class CheckpointError(GceError):
    """A checkpoint is missing, corrupt or belongs to another model configuration."""
