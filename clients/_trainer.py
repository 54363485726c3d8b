"""The trainer's client methods (its HTTP API, /v1/training/jobs), written once for TrainerClient and
AsyncTrainerClient. Jobs are the trainer's JSON objects: `id`, `adapter_id`, `method`, `status`
("queued" | "running" | "succeeded" | "failed" | "cancelled" | "rejected"), `progress` (`step`,
`total_steps`, `loss`), `metrics`, `error`."""

from __future__ import annotations

import builtins
import io
import json
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from adapterd.clients._core import Call, StreamCall, endpoint, stream_endpoint
from adapterd.clients._http_protocol import FilePart, HttpRequest
from adapterd.clients.errors import JobNotFound, from_body

Job = dict[str, Any]
# A JSONL file's path, or the records themselves (dicts, or JSON lines as strings).
TrainingData = str | Path | Iterable[Mapping[str, Any] | str]
ENDED = ("succeeded", "failed", "cancelled", "rejected")


def data_part(name: str, data: TrainingData) -> FilePart:
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no such file: {path}")
        return FilePart(name, path.name, path, "application/jsonl")
    lines = (line if isinstance(line, str) else json.dumps(line) for line in data)
    return FilePart(
        name, f"{name}.jsonl", "".join(f"{line.rstrip()}\n" for line in lines).encode(), "application/jsonl"
    )


def tasks_part(tasks: str | Path) -> FilePart:
    """lm-eval task YAML and data to ship with a job: a directory (sent as a gzip tar of its contents) or
    a tar archive already made."""
    path = Path(tasks)
    if path.is_file():
        return FilePart("tasks", path.name, path, "application/x-tar")
    if not path.is_dir():
        raise FileNotFoundError(f"tasks: no such directory or archive: {path}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member in sorted(path.rglob("*")):
            if member.is_file():
                archive.add(member, arcname=member.relative_to(path).as_posix(), recursive=False)
    return FilePart("tasks", f"{path.name}.tar.gz", buffer.getvalue(), "application/gzip")


JOBS = "/v1/training/jobs"


def job_path(job_id: str, suffix: str = "") -> str:
    return f"{JOBS}/{quote(job_id, safe='')}{suffix}"


def jobs(body: Any) -> builtins.list[Job]:
    """A job listing, `{"object": "list", "data": [job, ...]}`, as /v1/adapters answers."""
    return builtins.list(body["data"])


def job_events(event: Any) -> builtins.list[Job]:
    """One event of /events, `{"type": "status" | "progress" | "metrics", "job": job}`: the job after the
    change. An error event (`{"error": {...}}`) ends the stream with its typed error."""
    if isinstance(event, dict) and isinstance(event.get("error"), dict):
        raise from_body(event, not_found=JobNotFound)
    return [event["job"]]


class TrainerApi:
    @endpoint
    def submit(
        self,
        config: Mapping[str, Any],
        data: TrainingData,
        eval_data: TrainingData | None = None,
        tasks: str | Path | None = None,
    ) -> Call[Job]:
        """Queue a training job. `config` has at least adapter_id and method ("lora" | "qlora" |
        "dora" | "ia3" | "prompt_tuning" | "p_tuning" | "prefix_tuning"), and optional hyper-parameters (rank, alpha, target_modules, num_virtual_tokens,
        epochs, max_steps, learning_rate, batch_size, max_seq_len, seed), `eval_tasks` (lm-eval tasks
        scored for the base and the adapter) and `register_if` ({"task", "metric", "min_delta"}: register
        only an adapter that beats the base by min_delta). `data` and `eval_data` are JSONL files or
        records ({"prompt", "completion"} or {"messages": [...]}); `tasks` a directory (or tar archive) of
        lm-eval task YAML and data files for eval_tasks. Returns the queued job."""
        files = [data_part("data", data)]
        if eval_data is not None:
            files.append(data_part("eval_data", eval_data))
        if tasks is not None:
            files.append(tasks_part(tasks))
        request = HttpRequest("POST", JOBS, form={"config": json.dumps(dict(config))}, files=tuple(files))
        return Call(request, dict, not_found=JobNotFound)

    @endpoint
    def get(self, job_id: str) -> Call[Job]:
        """One job as it is now; JobNotFound if unknown."""
        return Call(HttpRequest("GET", job_path(job_id)), dict, idempotent=True, not_found=JobNotFound)

    @stream_endpoint
    def watch(self, job_id: str) -> StreamCall[Job]:
        """The job after each change (status, progress, metrics) until it ends."""
        request = HttpRequest("GET", job_path(job_id, "/events"), timeout_reads=False)
        return StreamCall(request, lambda: job_events, not_found=JobNotFound)

    @endpoint
    def cancel(self, job_id: str) -> Call[Job]:
        """Cancel a queued or running job; returns the job as it is then."""
        return Call(HttpRequest("POST", job_path(job_id, "/cancel")), dict, not_found=JobNotFound)

    @endpoint
    def list(self) -> Call[builtins.list[Job]]:
        """Every job, newest first."""
        return Call(HttpRequest("GET", JOBS), jobs, idempotent=True, not_found=JobNotFound)

    @endpoint
    def evaluate(self, data: TrainingData, adapter_id: str | None = None) -> Call[dict[str, Any]]:
        """Score a registered adapter (or the base model, when adapter_id is None) on held-out data
        through the server: greedy generation, then `exact_match`, `rouge1`, `rouge2`, `rougeL` and
        `num_examples`. AdapterNotFound if the server does not have the adapter."""
        form = {"adapter_id": adapter_id} if adapter_id else {}
        request = HttpRequest("POST", "/v1/evaluations", form=form, files=(data_part("data", data),))
        return Call(request, dict)
