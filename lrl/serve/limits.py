"""Request-size limit of ``lrl serve``: HTTP 413 for bodies over ``--max-request-mb``."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


def json_error(status: int, message: str, kind: str = "BadRequestError") -> JSONResponse:
    return JSONResponse({"success": False, "message": message, "error": {"message": message, "type": kind,
                                                                          "code": status}}, status_code=status)


class BodyTooLarge(StarletteHTTPException):
    """A request body over the server's limit: HTTP 413 (an HTTPException, so FastAPI's body reader passes it on
    instead of answering 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes (lrl serve --max-request-mb)")


class BodySizeLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` from ``Content-Length`` before reading them, and stop
    reading a chunked body once it passes the limit (JSON parsing of a body takes many times its size)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                return await json_error(400, f"invalid Content-Length {declared!r}")(scope, receive, send)
            if too_big:
                return await self._refuse(int(declared))(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)

    def _refuse(self, size: int) -> JSONResponse:
        return json_error(413, f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes "
                           "(lrl serve --max-request-mb)", "PayloadTooLarge")
