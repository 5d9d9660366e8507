"""ASGI guards that run before a request body is read: bearer-token auth and a body-size cap.

The size cap counts the bytes actually received, so a chunked upload without Content-Length is
stopped as soon as it passes the limit, not after it was buffered whole.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(send: Send, status: int, code: str, detail: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": code, "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class TokenAuthMiddleware:
    """Requires `Authorization: Bearer <token>` (constant-time compare) outside `public`."""

    def __init__(self, app: ASGIApp, token: str | None, public: frozenset[str]) -> None:
        self.app = app
        self.expected = token.encode() if token else None
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or self.expected is None or scope["path"] in self.public
                or self._authorised(_header(scope, b"authorization") or b"")):
            await self.app(scope, receive, send)
            return
        await send_error(send, 401, "unauthorized", "missing or wrong bearer token "
                         "(send 'Authorization: Bearer <token>')",
                         [(b"www-authenticate", b"Bearer")])

    def _authorised(self, header: bytes) -> bool:
        scheme, _, value = header.partition(b" ")
        assert self.expected is not None
        ok = hmac.compare_digest(value.strip(), self.expected)
        return ok and scheme.lower() == b"bearer"


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Answers 413 once a request body passes `max_bytes`, by header or by bytes received."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await send_error(send, 400, "bad_request", "invalid Content-Length")
                return
            if int(declared) > self.max_bytes:
                await self._refuse(send)
                return
        await self._guarded(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        received, exceeded, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:  # the app asks again after our refusal: end the body
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # whatever the app says after a cut body, the answer is 413
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await send_error(send, 413, "too_large",
                         f"request body is larger than {self.max_bytes} bytes")
