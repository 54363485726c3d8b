"""The trainer's core, shared by its HTTP and gRPC front ends: submit, inspect, watch and cancel jobs.

Jobs run one at a time, each in a worker subprocess (worker.py), so a crash or an out-of-memory kill fails
that job only. The runner reads the worker's JSON-lines events into the job, and on success uploads the
adapter to the server. Watchers get one event per change: ("status" | "progress" | "metrics", job dict).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterd.server.common.auth import Principal
from adapterd.server.common.errors import AdapterdError
from adapterd.server.trainer.config import RANKED_METHODS, JobConfig
from adapterd.server.trainer.data import read_examples, split_held_out
from adapterd.server.trainer.errors import InvalidConfig, JobNotFound
from adapterd.server.trainer.gate import GateError, decide, rejection
from adapterd.server.trainer.jobs import ENDED, INTERRUPTED, Job, JobStore, new_job_id, utc_now
from adapterd.server.trainer.process import exit_reason, read_event, signal_group, start_worker, stop_worker
from adapterd.server.trainer.remote import ServerClient
from adapterd.server.trainer.tasks import check_names, unpack
from adapterd.server.trainer.worker import ADAPTER_DIR, CONFIG_FILE, DATA_FILE, EVAL_DATA_FILE, TASKS_DIR

log = logging.getLogger("adapterd.trainer")
LOG_FILE = "worker.log"
MAX_TASKS_BYTES = 1024**3  # a shipped task archive, unpacked
CANCEL_WAIT_S = 30.0  # a cancelled worker stops within seconds; past this, cancel answers "running"
Event = tuple[str, dict[str, Any]]
WORKER = (sys.executable, "-m", "adapterd.server.trainer.worker")  # then: JOB_DIR --model-dir --device


@dataclass(frozen=True)
class Base:
    """The base model this trainer trains on."""

    name: str  # the server's name for it (adapter base_model)
    path: Path  # its Hugging Face directory
    device: str  # auto | cuda | cpu
    dtype: str  # what training and evaluation compute in: bfloat16 on CUDA, float32 on CPU


class TrainerService:
    def __init__(
        self, store: JobStore, base: Base, server: ServerClient, worker: Sequence[str] = WORKER
    ) -> None:
        self.store = store
        self.base = base
        self.server = server
        self.worker = tuple(worker)
        self.jobs = {job.id: job for job in store.load()}
        self.queue = collections.deque(j.id for j in self.jobs.values() if j.status == "queued")
        self._wakeup = asyncio.Event()
        self._watchers: dict[str, list[asyncio.Queue[Event]]] = {}
        self._worker: asyncio.subprocess.Process | None = None
        self._upload: asyncio.Task[dict[str, Any]] | None = None
        self._cancelling: set[str] = set()

    # -- the API ------------------------------------------------------------------------------------------

    async def submit(
        self,
        config: JobConfig,
        data: Path,
        eval_data: Path | None,
        principal: Principal,
        tasks: Path | None = None,
    ) -> Job:
        """Validate the files (every bad line reported) and the evaluation tasks (`tasks`: a tar archive of
        task YAML and data), then queue the job. The files are moved."""
        principal.require_owner(config.adapter_id)
        unpacked = await asyncio.to_thread(_validate, config, data, eval_data, tasks)
        job = Job(
            id=new_job_id(),
            seq=max((j.seq for j in self.jobs.values()), default=0) + 1,
            adapter_id=config.adapter_id,
            method=config.method,
            config=config.to_dict(),
            created_at=utc_now(),
        )
        with self.store.create(job) as job_dir:
            (job_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict()))
            shutil.move(data, job_dir / DATA_FILE)
            if eval_data is not None:
                shutil.move(eval_data, job_dir / EVAL_DATA_FILE)
            if unpacked is not None:
                shutil.move(unpacked, job_dir / TASKS_DIR)
        self.jobs[job.id] = job
        self.queue.append(job.id)
        self._wakeup.set()
        log.info("job %s queued: %s adapter %r", job.id, job.method, job.adapter_id)
        return job

    def get(self, job_id: str, principal: Principal) -> Job:
        job = self.jobs.get(job_id)
        if job is None or not principal.can_see(job.adapter_id):
            raise JobNotFound(f"job {job_id!r} does not exist")
        return job

    def list_jobs(self, principal: Principal) -> list[Job]:
        """Newest first."""
        visible = [j for j in self.jobs.values() if principal.can_see(j.adapter_id)]
        return sorted(visible, key=lambda j: -j.seq)

    async def cancel(self, job_id: str, principal: Principal) -> Job:
        """Cancel a queued job at once, a running one by stopping its worker (or its upload) and waiting
        (up to CANCEL_WAIT_S) until it has ended, so the answer shows it cancelled."""
        job = self.get(job_id, principal)
        principal.require_owner(job.adapter_id)
        if job.status == "queued":
            self.queue.remove(job.id)
            self._finish(job, "cancelled")
        elif job.status == "running" and job.id not in self._cancelling:
            self._cancelling.add(job.id)
            if self._upload is not None:
                self._upload.cancel()
            elif self._worker is not None:
                signal_group(self._worker, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_S
        while job.status not in ENDED and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return job

    async def watch(self, job_id: str, principal: Principal) -> AsyncIterator[Event]:
        """The job now ("status"), then one event per change until it has ended."""
        job = self.get(job_id, principal)
        events: asyncio.Queue[Event] = asyncio.Queue()
        self._watchers.setdefault(job_id, []).append(events)
        try:
            snapshot = job.to_dict()
            yield "status", snapshot
            while snapshot["status"] not in ENDED:
                kind, snapshot = await events.get()
                yield kind, snapshot
        finally:
            self._watchers[job_id].remove(events)

    # -- the runner ---------------------------------------------------------------------------------------

    async def run_forever(self) -> None:
        """Run queued jobs one at a time, in order, until cancelled (which fails the running job)."""
        while True:
            while not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            job = self.jobs[self.queue.popleft()]
            try:
                await self._run(job)
            except asyncio.CancelledError:
                self._finish(job, "failed", INTERRUPTED)
                raise
            except Exception as exc:  # a bug of ours: fail this job, keep serving the others
                log.exception("job %s failed in the runner", job.id)
                self._finish(job, "failed", f"internal error in the trainer: {type(exc).__name__}: {exc}")

    async def _run(self, job: Job) -> None:
        job.status, job.started_at = "running", utc_now()
        self._changed(job, "status")
        job_dir = self.store.job_dir(job.id)
        error = await self._check_server(job)
        if error is None and job.id not in self._cancelling:
            error = await self._train(job, job_dir)
        if job.id in self._cancelling:
            self._finish(job, "cancelled")
        elif error is not None:
            self._finish(job, "failed", error)
        elif self._passes_gate(job):
            await self._register(job, job_dir)

    def _passes_gate(self, job: Job) -> bool:
        """Apply register_if (if any) to the job's metrics, recording the outcome in them; a job that does
        not pass ends here, rejected (or failed, when the gate names a metric its task does not report)."""
        gate = job.config.get("register_if")
        if not gate:
            return True
        try:
            outcome = decide(gate, job.metrics or {})
        except GateError as exc:
            self._finish(job, "failed", str(exc))
            return False
        job.metrics = {**(job.metrics or {}), "gate": outcome}
        if not outcome["passed"]:
            self._finish(job, "rejected", rejection(outcome))
        return bool(outcome["passed"])

    async def _check_server(self, job: Job) -> str | None:
        """Fail early when the server cannot take this adapter; an unreachable server is checked again at
        upload time."""
        try:
            info = await self.server.info()
        except AdapterdError as exc:
            log.warning("job %s: %s; training anyway", job.id, exc)
            return None
        if info.get("model_id") != self.base.name:
            return f"the server serves {info.get('model_id')!r} but this trainer trains {self.base.name!r}"
        max_rank = info.get("max_rank")
        if job.method in RANKED_METHODS and isinstance(max_rank, int) and job.config["rank"] > max_rank:
            return f"rank {job.config['rank']} exceeds the server's --max-rank {max_rank}"
        return None

    async def _train(self, job: Job, job_dir: Path) -> str | None:
        """Run the worker to the end; None on success, else why it failed."""
        model = ("--model-dir", str(self.base.path), "--device", self.base.device)
        worker = await start_worker((*self.worker, str(job_dir), *model), job_dir / LOG_FILE)
        self._worker, job.worker_pid = worker, worker.pid
        self._changed(job, "progress", durable=True)
        if job.id in self._cancelling:  # cancelled while the worker was starting
            signal_group(worker, signal.SIGTERM)
        error = None
        try:
            assert worker.stdout is not None
            async for line in worker.stdout:
                error = self._apply(job, read_event(line)) or error
            code = await worker.wait()
        finally:
            if worker.returncode is None:  # the runner is being cancelled: the trainer is stopping
                await stop_worker(worker)
            self._worker = None
        if code == 0:
            return None
        return error or exit_reason(code, job_dir / LOG_FILE)

    def _apply(self, job: Job, event: dict[str, Any]) -> str | None:
        """Fold one worker event into the job; returns the error an "error" event carries."""
        kind = event.pop("event", None)
        if kind is None:
            return None
        if kind == "error":
            return str(event["message"])
        if kind == "phase":
            job.phase = event["phase"]
        elif kind == "data":
            job.num_train_examples = event["num_train_examples"]
            job.num_eval_examples = event["num_eval_examples"]
        elif kind == "progress":
            job.record_progress(event)
        elif kind == "metrics":
            job.metrics = event
        self._changed(job, "metrics" if kind == "metrics" else "progress", durable=kind != "progress")
        return None

    async def _register(self, job: Job, job_dir: Path) -> None:
        job.phase = "uploading"
        self._changed(job, "progress")
        self._upload = asyncio.create_task(
            self.server.upload_adapter(job.adapter_id, job_dir / ADAPTER_DIR, self._metadata(job))
        )
        try:
            job.adapter = await self._upload
        except asyncio.CancelledError:
            if job.id not in self._cancelling:
                raise
            self._finish(job, "cancelled")
            return
        except AdapterdError as exc:
            self._finish(job, "failed", f"uploading the adapter failed: {exc}")
            return
        finally:
            self._upload = None
        self._finish(job, "succeeded")

    def _metadata(self, job: Job) -> dict[str, Any]:
        """What the server records with the adapter."""
        return {
            "job_id": job.id,
            "method": job.method,
            "base_model": self.base.name,
            "quantization": "nf4" if job.method == "qlora" else "none",
            "dtype": self.base.dtype,
            "config": job.config,
            "metrics": _named_tasks_only(job.metrics, job.config.get("eval_tasks") or []),
        }

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error, job.finished_at, job.phase = status, error, utc_now(), ""
        self._cancelling.discard(job.id)
        log.info("job %s %s%s", job.id, status, f": {error}" if error else "")
        self._changed(job, "status")

    def _changed(self, job: Job, kind: str, durable: bool = True) -> None:
        if durable or kind != "progress":
            self.store.save(job)
        snapshot = job.to_dict()
        for events in self._watchers.get(job.id, []):
            events.put_nowait((kind, snapshot))


def _validate(config: JobConfig, data: Path, eval_data: Path | None, tasks: Path | None) -> Path | None:
    """Check the data files and the evaluation tasks; the shipped tasks unpacked (beside the archive)."""
    with data.open("rb") as lines:
        examples = read_examples(lines, "data")
    held_out = None
    if eval_data is not None:
        with eval_data.open("rb") as lines:
            held_out = read_examples(lines, "eval_data")
    split_held_out(examples, held_out, config.seed)
    if tasks is not None and not config.eval_tasks:
        raise InvalidConfig("eval_tasks", "tasks were shipped, but eval_tasks names none to evaluate")
    unpacked = None
    if tasks is not None:
        unpacked = tasks.with_name(f"{tasks.name}.unpacked")
        unpack(tasks, unpacked, MAX_TASKS_BYTES)
    if config.eval_tasks:
        check_names(config.eval_tasks, unpacked)
    return unpacked


def _named_tasks_only(metrics: dict[str, Any] | None, names: list[str]) -> dict[str, Any] | None:
    """The metrics for the adapter's metadata: lm-eval's results only for the tasks (and groups) the job
    named, not every subtask of a group (MMLU has 57), so that the metadata stays small."""
    if not metrics or "tasks" not in metrics:
        return metrics
    tasks = {
        model: {task: values for task, values in results.items() if task in names}
        for model, results in metrics["tasks"].items()
    }
    return {**metrics, "tasks": tasks}
