"""Errors in the shape clients parse: OpenAI's `{"error": {message, type, param, code}}`, and
Anthropic's `{"type": "error", "error": {type, message}}` on the Messages API."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 500: "server_error", 503: "overloaded_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(request: Request | None, status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    kind = TYPES.get(status, "invalid_request_error")
    if request is not None and request.url.path.startswith("/v1/messages"):
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or (where if loc else None)
        if err.get("type") == "json_invalid" or isinstance(err.get("input"), bytes | str) and not loc:
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
        elif err.get("type") == "missing":
            parts.append(f"'{where}' is required")
        else:
            parts.append(f"'{where}': {err['msg']} (got {err.get('input')!r:.60})")
    return "; ".join(parts), param


def install(app) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(request, exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = describe_validation(exc)
        return error_response(request, 400, message, param, "invalid_value")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            return error_response(request, 404, f"unknown route {request.method} {request.url.path}",
                                  code="not_found")
        if exc.status_code == 405:
            return error_response(request, 405, f"method {request.method} not allowed on {request.url.path}")
        return error_response(request, exc.status_code, str(exc.detail))
