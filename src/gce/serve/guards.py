"""ASGI layers in front of the app: request bodies bounded in size, time and number; HEAD as GET.

They answer in the API's error shape, ``{"error": "<one line>"}``, like every other refusal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Methods whose requests have no body the app reads: never counted, never held.
BODYLESS = ("GET", "HEAD", "OPTIONS")


async def send_error(send: Send, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """A complete JSON error answer that also closes the connection (its request may be unread)."""
    body = json.dumps({"error": " ".join(message.split())}, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyGuard:
    """Bound what request bodies can hold, before any of it reaches a parser.

    * size: a declared Content-Length over ``max_bytes`` is refused (413) unread; a chunked body is
      counted while it arrives and refused as soon as it is over;
    * time: the whole body must arrive within ``timeout_s`` of its headers, else 408 (a client that
      stalls mid-upload would hold its buffered part forever);
    * number: at most ``max_open`` requests with a body are read or answered at once (each may hold
      up to ``max_bytes``); one more is answered 503 at once, without waiting for a slot.

    The accepted body is replayed to the app. ``describe`` says what the limit is made of.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_open: int, timeout_s: float, describe: str = "") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_open = max_open
        self.timeout_s = timeout_s
        self.describe = describe
        self.open = 0  # changed on the event loop's thread only: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS:
            await self.app(scope, receive, send)
            return
        if self.open >= self.max_open:
            await send_error(
                send,
                503,
                f"busy: {self.max_open} requests with a body are in progress, the most this server takes "
                "at once; try again shortly",
                [(b"retry-after", b"1")],
            )
            return
        self.open += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.open -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = f"the limit of {self.max_bytes} bytes{self.describe}"
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await send_error(send, 413, f"request body of {declared} bytes is over {limit}")
            return
        chunks: list[bytes] = []
        total = 0
        with anyio.move_on_after(self.timeout_s) as timer:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                total += len(body)
                if total > self.max_bytes:  # no length declared: its full size is unknown, so none is said
                    await send_error(send, 413, f"request body is over {limit}")
                    return
                chunks.append(body)
                if not message.get("more_body", False):
                    break
        if timer.cancelled_caught:
            chunks.clear()
            expected = f" of {declared}" if declared is not None else ""
            await send_error(
                send, 408, f"request body not received in time: {total}{expected} bytes in {_seconds(self.timeout_s)} s"
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # the server itself refuses a bad one
    return None


def _seconds(value: float) -> str:
    return str(int(value)) if value == math.floor(value) else f"{value:g}"


class HeadAsGet:
    """Answer HEAD wherever GET is answered: the GET's status and headers, no body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
