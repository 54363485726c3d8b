"""One table of errors: each engine error knows its HTTP status and gRPC code."""

from __future__ import annotations

# The most characters of a message an error answer carries: a message quoting a client's megabyte-long id
# would otherwise travel back whole (and overflow a gRPC client's metadata limit).
MAX_ERROR_MESSAGE_CHARS = 2000


def bounded(message: str) -> str:
    if len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    cut = len(message) - MAX_ERROR_MESSAGE_CHARS
    return f"{message[:MAX_ERROR_MESSAGE_CHARS]}... ({cut} more characters)"


class AdapterdError(Exception):
    """Base of every error a client may cause; never a 500. `param` names the request field at fault."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request"

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(AdapterdError):
    pass


class AdapterNotFound(AdapterdError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    error_type = "adapter_not_found"


class InvalidAdapter(AdapterdError):
    http_status = 422
    error_type = "invalid_adapter"


class Overloaded(AdapterdError):
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "overloaded"


class EngineStopped(AdapterdError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "unavailable"


class RouteNotFound(AdapterdError):
    """HTTP only: no route has this path."""

    http_status = 404
    grpc_code = "UNIMPLEMENTED"
    error_type = "not_found"


class MethodNotAllowed(AdapterdError):
    """HTTP only: the route exists, not with this method (the answer's Allow header names those it takes)."""

    http_status = 405
    grpc_code = "UNIMPLEMENTED"
    error_type = "method_not_allowed"


class TrainerUnreachable(AdapterdError):
    """The server forwards the trainer's routes (--trainer URL); the trainer did not answer."""

    http_status = 502
    grpc_code = "UNAVAILABLE"
    error_type = "unavailable"


class Unauthorized(AdapterdError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    error_type = "unauthorized"


class Forbidden(AdapterdError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    error_type = "forbidden"


class PayloadTooLarge(AdapterdError):
    http_status = 413
    error_type = "payload_too_large"


class EngineFailed(AdapterdError):
    """Our fault, not the client's: the engine step failed (logged on the server)."""

    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "internal"


class CommandFailed(Exception):
    """A server-side command (`adapterd eval`, ...) could not do its work: printed as the other commands'
    errors are, one line `adapterd: error: ...` on stderr, exit status 1."""
