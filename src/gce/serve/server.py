"""The app under uvicorn, with the service's connection limits and JSON errors from the server too.

uvicorn answers a malformed request itself, in plain text, and keeps a connection that has sent
half a request line open forever; the protocol below answers in the API's JSON error shape, closes
connections that do not send their request's headers in time, and refuses connections over a cap.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gce.serve.settings import ServeSettings


def error_body(message: str) -> bytes:
    return json.dumps({"error": " ".join(message.split())}, separators=(",", ":")).encode()


def raw_error(status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A whole HTTP/1.1 error answer as bytes, for when h11 has no request to answer."""
    body = error_body(message)
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(b"connection", b"close"), *extra]
    head += [name + b": " + value for name, value in headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap, a header timeout and JSON errors."""

    max_connections = 512
    header_timeout_s = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            cap = self.max_connections
            message = f"busy: {cap} connections are open, the most this server takes; try again shortly"
            transport.write(raw_error(503, message, ((b"retry-after", b"1"),)))
            transport.close()
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        """Still no complete request line and headers: close; say why if some of them came."""
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return  # a request is being read or answered: the body's own timeout covers it
        if self.conn.trailing_data[0]:
            wait = f"{self.header_timeout_s:g}"
            self.transport.write(raw_error(408, f"request line and headers not received within {wait} s"))
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # a kept-alive connection: the next request's headers
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()  # type: ignore[union-attr]
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = error_body("malformed HTTP request: " + msg.rstrip(".").lower())
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            output = self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request"))
            output = (output or b"") + (self.conn.send(h11.Data(data=body)) or b"")
            output += self.conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:  # a response was already begun on this connection: just close
            output = b""
        self.transport.write(output)
        self.transport.close()


def protocol_for(settings: ServeSettings) -> type[GuardedH11Protocol]:
    """The protocol class with these settings' limits (uvicorn makes one instance per connection)."""
    limits: dict[str, Any] = {
        "max_connections": settings.max_connections,
        "header_timeout_s": settings.upload_timeout_s,
    }
    return type("ServeH11Protocol", (GuardedH11Protocol,), limits)


def make_server(app: Any, settings: ServeSettings, *, log_level: str = "info", root_path: str = "") -> uvicorn.Server:
    """A uvicorn server of ``app``: HTTP/1.1 by h11 with the limits above, no WebSocket upgrades."""
    config = uvicorn.Config(app, http=protocol_for(settings), ws="none", log_level=log_level, root_path=root_path)
    return uvicorn.Server(config)
