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
import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

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
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def json_depth(raw: bytes) -> int:
    """How deep `raw` nests arrays and objects, counted without parsing it (brackets in strings
    do not count).

    Linear in the body's length whatever its bytes: a handful of whole-array numpy passes and no
    regex. (The regex this replaces backtracked on an unterminated string full of `\\"` and held
    the event loop for seconds, issue 23; docs/BENCHMARKS.md, "Hostile request bodies".) A quote is
    a string delimiter when the run of backslashes just before it has even length; a byte is inside
    a string when an odd number of delimiters precede it. Backslashes outside strings are invalid
    JSON, which the parser refuses at that byte, so the count is exact for every prefix the parser
    reaches.
    """
    if not raw:
        return 0
    data = np.frombuffer(raw, dtype=np.uint8)
    index = np.arange(data.size, dtype=np.int64)
    is_backslash = data == _BACKSLASH
    # Position of the last byte that is not a backslash, at or before each position (-1: none).
    last_plain = np.maximum.accumulate(np.where(is_backslash, -1, index))
    quotes = np.flatnonzero(data == _QUOTE)
    before = quotes - 1
    run = np.where(before >= 0, before - last_plain[np.maximum(before, 0)], 0)  # backslashes before each quote
    delimiters = quotes[run % 2 == 0]
    toggles = np.zeros(data.size, dtype=np.int8)
    toggles[delimiters] = 1
    inside = (np.cumsum(toggles, dtype=np.int64) & 1).astype(bool)  # a delimiter itself counts as inside: no bracket
    steps = _OPEN[data].astype(np.int32)
    steps[inside] = 0
    return int(steps.cumsum().max(initial=0))


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range for a number")
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # fixed length: no backtracking
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"


def _surrogate_at(value, where: str) -> tuple[str, str] | None:
    """(path, character) of the first string (or key) holding a lone surrogate, else None.
    Depth is already bounded by the pre-scan, so the recursion is too."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return (where or "body", found.group()) if found else None
    if isinstance(value, dict):
        for key, item in value.items():
            hit = _surrogate_at(key, where or "body") or _surrogate_at(item, f"{where}.{key}" if where else key)
            if hit:
                return hit
    elif isinstance(value, list):
        for i, item in enumerate(value):
            hit = _surrogate_at(item, f"{where}[{i}]")
            if hit:
                return hit
    return None


def _int(text: str) -> int:
    return int(text)


def _object(pairs: list) -> dict:
    return dict(pairs)


# `_int` and `_object` are Python callbacks on purpose: the C parser holds the GIL for as long as it
# runs without calling back into Python, and on a megabyte of tiny objects or 4,300-digit integers
# that was 50-90 ms in which the event loop could not run (bench/body_cost.py). A Python call per
# number and object lets the interpreter hand the GIL to the loop every switch interval (5 ms).


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """A body as a JSON object, or ApiError(400) with a one-line message: never a RecursionError.

    Depth is checked before parsing (a body nesting 100,000 brackets would exhaust the parser's
    recursion); NaN/Infinity, which Python's parser accepts, are refused as JSON has no such values.
    The body must be UTF-8 without a byte order mark (Python's parser would also guess UTF-16 and
    UTF-32; RFC 8259 asks for UTF-8), and no string may hold a lone surrogate (`"\\ud800"`): it is
    not Unicode text, and a tokenizer fails on it (issue 23: a 500 on the single-stage server).
    Linear in the body's length; the servers run it off the event loop (`read_request`).
    """
    if not raw.strip():
        raise ApiError(400, "empty request body: send a JSON object")
    if raw.startswith(_BOM):
        raise ApiError(400, "request body starts with a byte order mark: send UTF-8 JSON without one")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not UTF-8 (UnicodeDecodeError: {err})") from None
    depth = json_depth(raw)
    if depth > max_depth:
        raise ApiError(400, f"request body nests {depth} levels deep, over the limit of {max_depth}")
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_int,
                          object_pairs_hook=_object)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"request body is not valid JSON (JSONDecodeError: {err})") from None
    except (ValueError, RecursionError) as err:  # a 5,000-digit integer, NaN, a depth the scan missed
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ApiError(400, f"request body is not valid JSON ({type(err).__name__}: {first_line})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):
        hit = _surrogate_at(data, "")
        if hit:
            where, char = hit
            raise ApiError(400, f"{where} holds a lone surrogate (U+{ord(char):04X}): not Unicode text; "
                                "send the character itself or a complete surrogate pair",
                                param=where.split(".")[0].split("[")[0])
    return data


# Bodies are parsed and validated here, not on the event loop: JSON parsing with per-number
# callbacks and pydantic validation of many small messages are linear but can take tens of
# milliseconds per megabyte, and /health must not wait for them. Two threads: hostile bodies
# queue behind each other instead of crowding the loop out of the GIL.
_PARSER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="body-parse")
T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` in the body-parsing threads; its exception (an ApiError) is raised here."""
    return await asyncio.get_running_loop().run_in_executor(_PARSER, fn, *args)


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The raw body, refusing (413) one over the limit before reading it all. The only work
    on the event loop is appending the chunks as they arrive."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise ApiError(413, f"request body over the limit of {max_body_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise ApiError(413, f"request body over the limit of {max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_request(request: Request, max_body_bytes: int, parse: Callable[[dict], T]) -> T:
    """The body read (`read_body`), then parsed as JSON and passed through `parse` (validation,
    the question) in one trip off the event loop."""
    raw = await read_body(request, max_body_bytes)
    return await off_loop(lambda: parse(parse_json_body(raw)))


async def read_json(request: Request, max_body_bytes: int) -> dict:
    """The body as a JSON object (`read_request` without further parsing)."""
    return await read_request(request, max_body_bytes, lambda data: data)


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


def utf8_bytes(token: str) -> list[int]:
    """A token's UTF-8 bytes, the `bytes` field of OpenAI's logprobs (a lone surrogate becomes '?')."""
    return list(token.encode("utf-8", errors="replace"))
