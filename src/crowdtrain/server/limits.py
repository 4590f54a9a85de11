"""Bounds on every request body before the application reads it (docs/API.md: every size is
bounded before it is read).

`BodyLimit` is pure ASGI middleware. A request to any route but the streamed uploads (whose
handlers bound their own bodies by the payload cap, ``routes.uploads``) may carry at most
`max_bytes` of body: one that declares more in `Content-Length` is answered 413 before a byte is
read; one that sends more (chunked, or lying about its length) is cut off at the cap and
answered 413. Every body, streamed uploads included, must keep arriving: a wait of more than
`idle_s` for its next chunk is answered 408 (a client that declares 35,000 bytes and sends 10
no longer holds a connection open forever). Early answers carry `Connection: close`, so the
unread rest of a body is never read as the next request.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The largest JSON body of any route that is not a streamed upload (register with an
#: identity token of up to 8 KB is the largest legitimate one).
MAX_JSON_BODY_BYTES = 64 * 1024
#: The longest a request body may stall between two chunks.
BODY_IDLE_S = 30.0
#: Routes whose handlers stream and bound their own bodies.
STREAMED_PREFIXES = ("/v1/contributions/", "/v1/verifications/")


class BodyTimeout(Exception):
    """A request body stopped arriving for longer than the idle limit."""


async def _answer(send: Send, status: int, code: str, detail: str) -> None:
    body = json.dumps({"error": code, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: request bodies bounded in size and in the time between chunks."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int = MAX_JSON_BODY_BYTES,
        idle_s: float = BODY_IDLE_S,
        streamed: tuple[str, ...] = STREAMED_PREFIXES,
    ) -> None:
        self.app, self.max_bytes, self.idle_s, self.streamed = app, max_bytes, idle_s, streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        body_done = False

        async def patient_receive() -> Message:
            """The next message, within `idle_s` while the body is still coming."""
            nonlocal body_done
            if body_done:  # after the body: only the disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_s)
            except TimeoutError:
                raise BodyTimeout(self._stalled()) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        if scope["path"].startswith(self.streamed):  # the app answers a BodyTimeout 408
            await self.app(scope, patient_receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _answer(send, 413, "too_large", self._too_large())
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await patient_receive()
            except BodyTimeout:
                await _answer(send, 408, "body_timeout", self._stalled())
                return
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _answer(send, 413, "too_large", self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def buffered_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, buffered_receive, send)

    def _too_large(self) -> str:
        return f"the body is larger than this route's cap of {self.max_bytes} bytes"

    def _stalled(self) -> str:
        return f"the request body stopped arriving for more than {self.idle_s:g} s"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
