"""A request-body size limit as ASGI middleware: bigger bodies get 413 before any handler
reads them, whether the client declares the size (Content-Length) or streams it chunked."""

from __future__ import annotations

import json

from gptcli.serve.protocol import ApiError


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        body, more = [], True
        size = 0
        while more:  # read it all here (API bodies are small), then hand it on whole
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send)
            body.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(body)}], receive), send)

    async def _refuse(self, send) -> None:
        error = ApiError(413, f"the request body is larger than the server's limit of {self.max_bytes} "
                              f"bytes (--max-body)")
        payload = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def _replay(messages: list[dict], then):
    """A `receive` that gives `messages` first, then defers to `then` (disconnects)."""
    pending = list(messages)

    async def receive() -> dict:
        if pending:
            return pending.pop(0)
        return await then()

    return receive
