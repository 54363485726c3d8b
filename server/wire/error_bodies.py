"""The JSON bodies an `AdapterdError` becomes on HTTP: OpenAI's shape (the default) and TGI's (its routes)."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException

from adapterd.server.common.errors import AdapterdError, MethodNotAllowed, RouteNotFound, bounded

TGI_PATHS = ("/", "/generate", "/generate_stream")
TGI_BY_ADAPTER = "/models/"  # the TGI routes with the adapter in the path


def error_body(path: str, exc: AdapterdError) -> dict[str, Any]:
    """The server's routes: LoRAX/TGI routes answer {error, error_type}; every other route the OpenAI shape."""
    return tgi_error(exc) if path in TGI_PATHS or path.startswith(TGI_BY_ADAPTER) else openai_error(exc)


def openai_error(exc: AdapterdError) -> dict[str, Any]:
    param = getattr(exc, "param", None)
    return {
        "error": {
            "message": bounded(str(exc)),
            "type": exc.error_type,
            "param": param,
            "code": exc.http_status,
        }
    }


def tgi_error(exc: AdapterdError) -> dict[str, str]:
    """TGI's error body; invalid input is TGI's `validation` type, so its clients raise ValidationError."""
    error_type = "validation" if exc.error_type == "invalid_request" else exc.error_type
    return {"error": bounded(str(exc)), "error_type": error_type}


def routing_error(exc: HTTPException, method: str, path: str) -> AdapterdError:
    """Starlette's routing refusals (no such path; not this method) as errors of the one table."""
    allow = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "?")
    if exc.status_code == 405:
        return MethodNotAllowed(f"{path} does not take {method} (it takes {allow})")
    if exc.status_code == 404:
        return RouteNotFound(f"no route {method} {path} (GET /openapi.json lists them)")
    error = AdapterdError(str(exc.detail))
    error.http_status = exc.status_code
    return error
