"""Every error the API returns is JSON {"error": {"code", "message", "param"}}: the handlers that make it so."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import HelipError, StorageError
from core.spec import spec_error

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "request_too_large", 415: "unsupported_media_type", 422: "invalid_request",
    429: "rate_limited", 503: "unavailable",
}


class ApiError(Exception):
    """An HTTP error with a stable code; raised by routes and dependencies."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers


def error_body(code: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param}, **extra}


def error_response(status: int, code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, param), status_code=status, headers=headers)


def not_found(what: str = "job") -> ApiError:
    return ApiError(404, "not_found", f"no such {what}")


def _validation_param(loc: tuple | list) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        where, parts = parts[0], parts[1:]
        if where == "header" and parts:
            return parts[0]
    return ".".join(parts) or None


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = tuple(first.get("loc", ()))
    # A job spec body: FastAPI validated it once already; word its errors as `helip run` does (no second parse).
    if loc and loc[0] == "body" and request.url.path.rstrip("/") == "/jobs" and isinstance(exc.body, dict):
        spec_exc = spec_error([{**e, "loc": tuple(e.get("loc", ()))[1:]} for e in errors])
        return error_response(422, spec_exc.code, spec_exc.message, spec_exc.param)
    code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_request"
    # A body that is not JSON, or not an object, is wrong as a whole: the field at fault is the body itself.
    param = "body" if code == "invalid_json" else (_validation_param(loc) or (loc[0] if loc else None))
    msg = str(first.get("msg", "invalid request")).replace("Value error, ", "")
    return error_response(422, code, f"{param}: {msg}" if param else msg, param)


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)


async def _on_helip_error(request: Request, exc: HelipError) -> JSONResponse:
    # A store that is down is the service's fault, not the request's: 503, so clients retry.
    status = 503 if isinstance(exc, StorageError) and exc.code == "storage_error" else 422
    return error_response(status, exc.code, exc.message, exc.param)


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, None, getattr(exc, "headers", None))


async def _on_database_down(request: Request, exc: Exception) -> JSONResponse:
    # A dropped or restarting database is transient: 503 tells clients to retry, unlike a 500.
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, str(exc).splitlines()[0])
    return error_response(503, "database_unavailable", "the database is unreachable; retry later",
                          headers={"Retry-After": "2"})


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HelipError, _on_helip_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, _on_database_down)
    app.add_exception_handler(InterfaceError, _on_database_down)
    app.add_exception_handler(Exception, _on_unexpected)
