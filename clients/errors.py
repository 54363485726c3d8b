"""Typed errors shared by every adapterd client, over HTTP and gRPC alike.

One table (`ERRORS`) says which server `error_type`, HTTP statuses and gRPC status codes each exception
stands for, so a refused request raises the same exception type whatever the transport:

    try:
        client.generate("Hi", adapter_id="nope")
    except AdapterNotFound as exc:
        print(exc.message, exc.status, exc.code)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class AdapterdClientError(Exception):
    """Base of every error the clients raise. `status` is the HTTP status, `code` the gRPC status code name,
    `error_type` the server's own name for the error and `param` the request field at fault (HTTP), each
    when known."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        error_type: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.error_type = error_type
        self.param = param


class InvalidRequest(AdapterdClientError):
    """The server refused what was sent: bad parameters, a malformed or unsupported adapter, a bad id."""


class PayloadTooLarge(InvalidRequest):
    """An upload above the server's limit (HTTP 413; over gRPC the server answers INVALID_ARGUMENT)."""


class NotFound(AdapterdClientError):
    """Something named in the request does not exist."""


class AdapterNotFound(NotFound):
    """The adapter id is not registered (or not visible to this API key)."""


class JobNotFound(NotFound):
    """The training job id is unknown to the trainer."""


class Unauthorized(AdapterdClientError):
    """No API key, or a wrong one."""


class PermissionDenied(AdapterdClientError):
    """The API key may not do this (e.g. a `user` key uploading an adapter)."""


class Overloaded(AdapterdClientError):
    """The server has too many requests pending; try again later."""


class Unavailable(AdapterdClientError):
    """The server cannot take requests now (unreachable, starting or stopping)."""


class ConnectionFailed(Unavailable):
    """No connection to the server (refused, reset, DNS)."""


class Timeout(AdapterdClientError, TimeoutError):
    """No answer within the client's timeout."""


class ServerError(AdapterdClientError):
    """The server failed on its side (HTTP 5xx, gRPC INTERNAL); its log says why."""


@dataclass(frozen=True)
class ErrorRow:
    exception: type[AdapterdClientError]
    error_types: tuple[str, ...] = ()  # the server's error_type names
    statuses: tuple[int, ...] = ()  # HTTP
    codes: tuple[str, ...] = ()  # gRPC status code names


# Read in order: the first row naming a value wins. NotFound is refined by the call (see `error_class`).
ERRORS = (
    ErrorRow(AdapterNotFound, ("adapter_not_found",)),
    ErrorRow(JobNotFound, ("job_not_found",)),
    ErrorRow(NotFound, ("not_found",), (404,), ("NOT_FOUND",)),
    ErrorRow(PayloadTooLarge, ("payload_too_large",), (413,)),
    ErrorRow(
        InvalidRequest,
        ("invalid_request", "invalid_adapter", "validation"),
        (400, 422),
        ("INVALID_ARGUMENT",),
    ),
    ErrorRow(Unauthorized, ("unauthorized",), (401,), ("UNAUTHENTICATED",)),
    ErrorRow(PermissionDenied, ("forbidden", "permission_denied"), (403,), ("PERMISSION_DENIED",)),
    ErrorRow(Overloaded, ("overloaded",), (429,), ("RESOURCE_EXHAUSTED",)),
    ErrorRow(Unavailable, ("unavailable", "server_unavailable"), (502, 503), ("UNAVAILABLE",)),
    ErrorRow(Timeout, ("timeout",), (408, 504), ("DEADLINE_EXCEEDED",)),
    ErrorRow(ServerError, ("internal",), (500,), ("INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED")),
)


def error_class(
    error_type: str | None = None,
    status: int | None = None,
    code: str | None = None,
    not_found: type[NotFound] = AdapterNotFound,
) -> type[AdapterdClientError]:
    """The exception for a server's answer: by its error_type when it names one we know, else by the HTTP
    status or gRPC code. A bare "not found" becomes `not_found`, what the call looks up."""
    found = _lookup("error_types", error_type) or _lookup("statuses", status) or _lookup("codes", code)
    if found is NotFound:
        return not_found
    if found is not None:
        return found
    return ServerError if status is not None and status >= 500 else AdapterdClientError


def _lookup(column: str, value: str | int | None) -> type[AdapterdClientError] | None:
    if value is None:
        return None
    return next((row.exception for row in ERRORS if value in getattr(row, column)), None)


def from_body(
    body: Any, status: int | None = None, not_found: type[NotFound] = AdapterNotFound
) -> AdapterdClientError:
    """An error answer's JSON: LoRAX/TGI's `{"error": str, "error_type": str}` or the OpenAI shape
    `{"error": {"message", "type", ...}}` (also the shape of an error event inside a stream)."""
    error = body.get("error") if isinstance(body, dict) else None
    param = None
    if isinstance(error, dict):
        message, error_type = str(error.get("message", error)), error.get("type")
        param = error.get("param") if isinstance(error.get("param"), str) else None
    elif isinstance(error, str):
        message, error_type = error, body.get("error_type")
    else:
        message, error_type = (json.dumps(body) if body is not None else "no details"), None
    error_type = error_type if isinstance(error_type, str) else None
    cls = error_class(error_type, status, None, not_found)
    return cls(message, status=status, error_type=error_type, param=param)


def from_http(
    status: int, content: bytes, not_found: type[NotFound] = AdapterNotFound
) -> AdapterdClientError:
    """The exception for an HTTP error response (status >= 400) and its body."""
    try:
        body = json.loads(content)
    except ValueError:
        text = content.decode(errors="replace").strip()[:500]
        return error_class(None, status, None, not_found)(
            f"HTTP {status}: {text or 'no details'}", status=status
        )
    return from_body(body, status, not_found)


def from_grpc(
    code: str, details: str, error_type: str | None = None, not_found: type[NotFound] = AdapterNotFound
) -> AdapterdClientError:
    """The exception for a failed gRPC call: its status code name, details and, when the server sends it,
    the `adapterd-error-type` trailing metadata (which tells e.g. PayloadTooLarge from InvalidRequest)."""
    cls = error_class(error_type, None, code, not_found)
    return cls(details or code, code=code, error_type=error_type)
