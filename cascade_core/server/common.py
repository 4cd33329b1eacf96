"""What both servers (single-stage and cascade) share: the OpenAI error shape, body reading with a
size limit, request validation, bearer-token auth and the loopback check.

Kept in one place so that the two servers refuse bad input with the same words and status codes.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import re

import numpy as np

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException


DEFAULT_MAX_PROMPT_CHARS = 32_000  # both servers and `serve`: one default


class ApiError(Exception):
    """An error answered in the OpenAI error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 extra: dict | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.extra, self.headers = extra or {}, headers


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(status_code=err.status, content={**error_body(err.message, err.kind, err.param), **err.extra},
                        headers=err.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the OpenAI shape: ours, FastAPI's 404/405 and anything unexpected.

    An unexpected exception is answered as a bare 500 message; its traceback goes to the server
    log only, never to the client.
    """

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(status_code=err.status_code, content=error_body(str(err.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, err: RequestValidationError):
        return JSONResponse(status_code=400, content=error_body(f"invalid request: {err.errors()[:3]}",
                                                                "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception):
        return JSONResponse(status_code=500, content=error_body(
            f"internal error ({type(err).__name__}); see the server log", "server_error"))


MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: fast on long strings
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def json_depth(raw: bytes) -> int:
    """How deep `raw` nests arrays and objects, counted without parsing it (brackets in strings
    do not count). C-speed (one regex, one cumulative sum), so a 1 MB body costs milliseconds."""
    bare = _JSON_STRING.sub(b'""', raw)
    if not bare:
        return 0
    steps = _OPEN[np.frombuffer(bare, dtype=np.uint8)].astype(np.int32)
    return int(steps.cumsum().max(initial=0))


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range for a number")
    return value


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """A body as a JSON object, or ApiError(400) with a one-line message: never a RecursionError.

    Depth is checked before parsing (a body nesting 100,000 brackets would exhaust the parser's
    recursion); NaN/Infinity, which Python's parser accepts, are refused as JSON has no such values.
    """
    if not raw.strip():
        raise ApiError(400, "empty request body: send a JSON object")
    depth = json_depth(raw)
    if depth > max_depth:
        raise ApiError(400, f"request body nests {depth} levels deep, over the limit of {max_depth}")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not valid JSON (UnicodeDecodeError: {err})") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"request body is not valid JSON (JSONDecodeError: {err})") from None
    except (ValueError, RecursionError) as err:  # a 5,000-digit integer, NaN, a depth the scan missed
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ApiError(400, f"request body is not valid JSON ({type(err).__name__}: {first_line})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


async def read_json(request: Request, max_body_bytes: int) -> dict:
    """The body as a JSON object, refusing (413) a body over the limit before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise ApiError(413, f"request body over the limit of {max_body_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise ApiError(413, f"request body over the limit of {max_body_bytes} bytes")
        chunks.append(chunk)
    return parse_json_body(b"".join(chunks))


def validate_body(model: type[BaseModel], data: dict):
    """`data` as `model`, or a 400 naming the first few fields that are wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()[:5])
        first = err.errors()[0]["loc"] if err.errors() else ()
        raise ApiError(400, f"invalid request: {problems}", param=str(first[0]) if first else None) from None


def read_token(env_name: str | None) -> str | None:
    """The bearer token from the named environment variable; named but unset is an error now
    rather than an open server later."""
    if env_name is None:
        return None
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise ValueError(f"environment variable {env_name} is not set: it must hold the server's API key")
    return token


def bearer_checker(token: str | None):
    """A function that raises 401 unless the request carries `Authorization: Bearer <token>`.

    The comparison is constant-time (`hmac.compare_digest`), and no message repeats what was sent.
    """

    def check(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           kind="authentication_error")

    return check


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost': addresses no other machine can reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_host(host: str, allow_remote: bool) -> None:
    """Refuse to listen beyond this machine unless the user said so explicitly."""
    if not is_loopback(host) and not allow_remote:
        raise ValueError(f"--host {host} is not a loopback address: the server would be reachable from other "
                         "machines. Pass --allow-remote to do that on purpose (and set --token-env).")
