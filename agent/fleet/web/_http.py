"""What every route group shares at the HTTP edge: the error body and its status codes, and
request bodies and query parameters parsed and bounded, so no handler computes with NaN, an
unbounded number or a body that is not a JSON object."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agent.catalog.manifest import MAX_MANIFEST_BYTES
from agent.errors import EdgeAgentError, RateLimitedError, RequestError
from agent.fleet.bodies import read_bounded
from agent.fleet.table import QUERY_FIELDS

# A JSON API body: a manifest inline is the largest there is.
MAX_JSON_BODY_BYTES = MAX_MANIFEST_BYTES + 64 * 1024
HTTP_STATUS = {
    "bad_request": 400,
    "bad_filter": 400,
    "too_long": 400,
    "unknown_op": 400,
    "manifest_invalid": 400,
    "no_fit": 409,
    "in_rollout": 409,
    "too_large": 413,
    "busy": 429,
    "rate_limited": 429,
}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def on_error(request: Request, exc: Exception) -> Response:
    """The app's handler for an EdgeAgentError a handler raised: its code as the error body."""
    assert isinstance(exc, EdgeAgentError)
    response = error_response(HTTP_STATUS.get(exc.code, 500), exc.code, exc.message)
    if isinstance(exc, RateLimitedError):
        response.headers["retry-after"] = str(exc.retry_after_s)
    return response


def bad(message: str, field: str) -> EdgeAgentError:
    return RequestError(message, field=field)


def base_url(public_url: str | None, request: Request) -> str:
    """How devices and clients reach this controller: fleet.public_url, else the request's."""
    return (public_url or str(request.base_url)).rstrip("/")


def client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def table_params(request: Request) -> dict[str, str]:
    """The fleet table's query parameters of a page or stream address (others are its own)."""
    return {k: v for k, v in request.query_params.items() if k in QUERY_FIELDS}


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await read_bounded(request, MAX_JSON_BODY_BYTES) or b"{}")
    except RecursionError:  # [[[[…: nesting deeper than the parser's stack
        raise bad("body: nested too deeply", "body") from None
    except ValueError as exc:
        raise bad(f"body: not valid JSON ({exc})", "body") from None
    if not isinstance(body, dict):
        raise bad("body: must be a JSON object", "body")
    return body


def query_int(request: Request, name: str, default: int, *, high: int) -> int:
    """A whole-number query parameter from 0 to ``high``; anything else is bad_request."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(high))) or int(raw) > high:
        raise bad(f"{name}: a whole number from 0 to {high}", name)
    return int(raw)


def query_float(request: Request, name: str, default: float) -> float:
    """A finite, non-negative number (a timestamp, seconds); anything else is bad_request."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw) if len(raw) <= 32 else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise bad(f"{name}: a finite number, 0 or more", name)
    return value


def seconds(body: dict[str, Any], field: str, default: float) -> float:
    """A JSON body's duration, or ``default`` when absent; NaN, infinities, negatives, booleans
    and strings are bad_request, so no handler waits forever or computes with NaN."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0
    ):
        raise bad(f"{field}: a finite number of seconds, 0 or more", field)
    return float(value)
