"""TGI's `--payload-limit`: a request body over the limit is refused with 413 before any route reads it.

Pure ASGI, so it sees the declared `Content-Length` and, for chunked bodies, counts the bytes as they arrive.
Later messages (the client's disconnect) pass through, so routes still see a client leave.
"""

from __future__ import annotations

import json


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            return await self._refuse(send)
        # Read the body here, counting: the app would turn an error raised while it reads into a 400.
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()  # then the client's disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = json.dumps(
            {
                "error": f"Request body is larger than the payload limit of {self.max_bytes} bytes",
                "error_type": "payload_too_large",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
