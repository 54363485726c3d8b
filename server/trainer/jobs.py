"""Jobs and their persistence: one directory per job under `--work-dir`, its state in job.json.

    jobs/<job id>/job.json           the Job below, replaced atomically on every change
    jobs/<job id>/config.json        the validated JobConfig the worker reads
    jobs/<job id>/data.jsonl         the training data as uploaded (validated)
    jobs/<job id>/eval_data.jsonl    the held-out data, when given
    jobs/<job id>/tasks/             lm-eval tasks shipped with the job (YAML and data), when given
    jobs/<job id>/worker.log         the worker's stderr
    jobs/<job id>/adapter/           the trained adapter (PEFT format)

A job directory appears whole: it is written under tmp/ and renamed into jobs/. On opening, a job that was
`running` is marked failed (its worker died with the trainer) and `queued` jobs stay queued, in order.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "rejected")
ENDED = ("succeeded", "failed", "cancelled", "rejected")  # rejected: trained, but register_if refused it
JOB_FILE = "job.json"
MAX_CURVE_POINTS = 2000  # a longer curve keeps every other point: its shape, in a job.json that stays small
INTERRUPTED = "the trainer stopped while this job was running; submit it again"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_progress() -> dict[str, Any]:
    names = ("step", "total_steps", "loss", "learning_rate", "tokens_per_second", "eta_seconds")
    return dict.fromkeys(names, 0)


@dataclass
class Job:
    id: str
    seq: int  # submission order: the queue's order, and (reversed) the listing's
    adapter_id: str
    method: str
    config: dict[str, Any]
    created_at: str
    status: str = "queued"
    phase: str = ""  # while running: loading, evaluating_base, training, evaluating_adapter, uploading
    progress: dict[str, Any] = field(default_factory=new_progress)
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, loss] of each progress report
    metrics: dict[str, Any] | None = None  # {"base": scores, "adapter": scores, "tasks"?: ..., "gate"?: ...}
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    num_train_examples: int | None = None
    num_eval_examples: int | None = None
    adapter: dict[str, Any] | None = None  # the server's description of the uploaded adapter
    worker_pid: int | None = None

    def record_progress(self, progress: dict[str, Any]) -> None:
        """The worker's latest report, and its point on the loss curve (a late watcher draws it whole)."""
        self.progress = progress
        self.loss_curve.append([progress["step"], progress["loss"]])
        if len(self.loss_curve) > MAX_CURVE_POINTS:
            last, self.loss_curve = self.loss_curve[-1], self.loss_curve[::2]
            if self.loss_curve[-1] is not last:
                self.loss_curve.append(last)

    @property
    def has_ended(self) -> bool:
        return self.status in ENDED

    def to_dict(self) -> dict[str, Any]:
        """The public JSON (the HTTP API's job)."""
        public = asdict(self)
        del public["seq"], public["worker_pid"]
        return public

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Job:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class WorkDirInUse(OSError):
    pass


class JobStore:
    def __init__(self, work_dir: Path) -> None:
        self.root = work_dir / "jobs"
        self.tmp = work_dir / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(work_dir / ".lock")
        shutil.rmtree(self.tmp, ignore_errors=True)  # half-written submissions of an earlier run
        self.tmp.mkdir()

    def close(self) -> None:
        """Release the work directory (a process that exits releases it too)."""
        self._lock.close()

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def load(self) -> list[Job]:
        """Every stored job in submission order; a job that was running is marked failed."""
        jobs = []
        for path in sorted(self.root.glob(f"*/{JOB_FILE}")):
            job = Job.from_dict(json.loads(path.read_text()))
            if job.status == "running":
                kill_stray_worker(job)
                job.status, job.error, job.finished_at = "failed", INTERRUPTED, utc_now()
                self.save(job)
            jobs.append(job)
        return sorted(jobs, key=lambda j: j.seq)

    @contextmanager
    def create(self, job: Job) -> Iterator[Path]:
        """A fresh directory to put the job's files in; it becomes the job's once the block succeeds."""
        staging = self.tmp / job.id
        staging.mkdir()
        try:
            yield staging
            write_atomically(staging / JOB_FILE, job_json(job))
            os.replace(staging, self.job_dir(job.id))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def save(self, job: Job) -> None:
        write_atomically(self.job_dir(job.id) / JOB_FILE, job_json(job))


def kill_stray_worker(job: Job) -> None:
    """A worker that outlived its trainer (it normally dies with it): kill it if it is still this job's."""
    if job.worker_pid is None:
        return
    try:
        cmdline = Path(f"/proc/{job.worker_pid}/cmdline").read_bytes()
    except OSError:
        return  # gone (or not Linux)
    if job.id.encode() in cmdline:
        os.kill(job.worker_pid, signal.SIGKILL)


def _lock(path: Path) -> IO[bytes]:
    """Hold `path` locked for as long as this process lives: one trainer per work directory."""
    file = path.open("ab")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        file.close()
        raise WorkDirInUse(f"another trainer is using the work directory {path.parent}") from exc
    return file


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:16]}"


def job_json(job: Job) -> bytes:
    return json.dumps(asdict(job), indent=1).encode()


def write_atomically(path: Path, data: bytes) -> None:
    """Write a temporary file, fsync it, rename it over `path`: readers see the old or the new bytes."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
