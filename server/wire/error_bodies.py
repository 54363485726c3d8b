"""The JSON bodies an `AdapterdError` becomes on HTTP: OpenAI's shape (the default) and TGI's (its routes)."""

from __future__ import annotations

from typing import Any

from adapterd.server.common.errors import AdapterdError, bounded


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
