"""The one error type of the service: a client mistake with its HTTP status and a one-line message."""

from __future__ import annotations

from gce.errors import GceError


class RequestError(GceError):
    """A bad request. ``status`` is the 4xx code the API answers with; the message is one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line whatever the source text was
        self.status = status
