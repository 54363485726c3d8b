"""The trainer's errors, in the server's one error table (HTTP status, gRPC code, error type)."""

from __future__ import annotations

from adapterd.server.common.errors import AdapterdError, InvalidRequest


class InvalidConfig(InvalidRequest):
    """A job config field is unknown, missing or out of range; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"config.{field}: {message}" if field else f"config: {message}")
        self.field = field


class InvalidData(InvalidRequest):
    """A training or evaluation file is malformed; every problem names its line."""

    def __init__(self, name: str, problems: list[str], total: int | None = None) -> None:
        total = len(problems) if total is None else total
        shown = "; ".join(problems)
        more = f" (and {total - len(problems)} more)" if total > len(problems) else ""
        super().__init__(f"{name}: {total} invalid line{'s' if total != 1 else ''}: {shown}{more}")
        self.problems = problems


class JobNotFound(AdapterdError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    error_type = "job_not_found"


class ServerUnavailable(AdapterdError):
    """The adapterd server the trainer uploads to (or evaluates through) did not answer."""

    http_status = 502
    grpc_code = "UNAVAILABLE"
    error_type = "server_unavailable"
