"""The trainer's job runner with a scripted worker (no model): success and upload with metadata, events in
order, a worker error, a crash, a kill -9, cancellation (queued, running, before start), refusals from the
server, and that the next job always runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from adapterd.server.auth import OPEN, Principal
from adapterd.server.errors import Forbidden, InvalidRequest
from adapterd.server.trainer.config import JobConfig
from adapterd.server.trainer.errors import InvalidData, JobNotFound, ServerUnavailable
from adapterd.server.trainer.jobs import JobStore
from adapterd.server.trainer.service import Base, TrainerService

# Behaves by adapter id: "ok*" succeeds, "slow*" waits (to be cancelled or killed), "fails" reports an
# error, "crash" dies with a traceback, "quiet-crash" exits 3 with nothing on stderr.
FAKE_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    job_dir = sys.argv[1]
    config = json.load(open(os.path.join(job_dir, "config.json")))
    name = config["adapter_id"]
    def emit(event, **fields):
        print(json.dumps({"event": event, **fields}), flush=True)
    progress = dict(step=1, total_steps=2, loss=1.5, learning_rate=0.001, tokens_per_second=100.0, eta_seconds=1.0)
    scores = dict(exact_match=0.0, rouge1=0.1, rouge2=0.0, rougeL=0.1, num_examples=2)
    emit("phase", phase="loading")
    emit("data", num_train_examples=3, num_eval_examples=2)
    emit("metrics", base=scores)
    emit("phase", phase="training")
    emit("progress", **progress)
    if name.startswith("slow"):
        open(os.path.join(job_dir, "started"), "w").close()
        time.sleep(120)
    if name == "fails":
        emit("error", message="every training prompt is too long")
        sys.exit(1)
    if name == "crash":
        sys.stderr.write("Traceback: something broke\\n")
        sys.exit(3)
    emit("progress", **dict(progress, step=2, eta_seconds=0.0))
    emit("metrics", base=scores, adapter=dict(scores, exact_match=1.0))
    os.makedirs(os.path.join(job_dir, "adapter"))
    """
)


class FakeServer:
    def __init__(self, model_id: str = "base", reachable: bool = True) -> None:
        self.model_id = model_id
        self.reachable = reachable
        self.uploads: list[tuple[str, Path, dict[str, Any]]] = []

    async def info(self) -> dict[str, Any]:
        if not self.reachable:
            raise ServerUnavailable("cannot reach the adapterd server")
        return {"model_id": self.model_id, "max_rank": 64}

    async def upload_adapter(self, adapter_id: str, path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
        if not self.reachable:
            raise ServerUnavailable("cannot reach the adapterd server")
        if adapter_id == "ok-refused":
            raise InvalidRequest("the server answered 422: adapter refused")
        self.uploads.append((adapter_id, path, metadata))
        return {"id": adapter_id, "version": 1}


Scenario = Callable[[TrainerService, FakeServer], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, server: FakeServer | None = None) -> None:
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)

    async def main() -> None:
        fake = server or FakeServer()
        base = Base("base", tmp_path, "cpu", "float32")
        service = TrainerService(JobStore(tmp_path / "work"), base, fake, (sys.executable, str(worker)))  # type: ignore[arg-type]
        runner = asyncio.create_task(service.run_forever())
        try:
            await asyncio.wait_for(scenario(service, fake), timeout=60)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(main())


def data_file(tmp_path: Path, name: str = "data.jsonl", lines: int = 3) -> Path:
    path = tmp_path / name
    path.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(lines))
    )
    return path


async def submit(service: TrainerService, tmp_path: Path, adapter_id: str, **config: Any) -> str:
    job_config = JobConfig.from_dict({"adapter_id": adapter_id, "method": "lora", **config})
    job = await service.submit(job_config, data_file(tmp_path), None, OPEN)
    return job.id


async def events(service: TrainerService, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [event async for event in service.watch(job_id, OPEN)]


async def ended(service: TrainerService, job_id: str) -> dict[str, Any]:
    return (await events(service, job_id))[-1][1]


async def started(service: TrainerService, job_id: str) -> None:
    marker = service.store.job_dir(job_id) / "started"
    while not marker.exists():
        await asyncio.sleep(0.05)


def test_a_job_succeeds_and_its_adapter_is_uploaded_with_metadata(tmp_path: Path) -> None:
    async def scenario(service: TrainerService, server: FakeServer) -> None:
        job_id = await submit(service, tmp_path, "ok")
        seen = await events(service, job_id)
        job = seen[-1][1]
        assert job["status"] == "succeeded" and job["error"] is None
        assert job["progress"]["step"] == 2 and job["progress"]["total_steps"] == 2
        assert job["metrics"]["adapter"]["exact_match"] == 1.0
        assert job["metrics"]["base"]["exact_match"] == 0.0
        assert (job["num_train_examples"], job["num_eval_examples"]) == (3, 2)
        assert job["adapter"] == {"id": "ok", "version": 1}
        assert job["started_at"] and job["finished_at"]
        kinds = [kind for kind, _ in seen]
        assert kinds[0] == "status" and kinds[-1] == "status" and "metrics" in kinds and "progress" in kinds
        statuses = [j["status"] for _, j in seen]
        assert statuses.index("running") < statuses.index("succeeded")
        [(adapter_id, path, metadata)] = server.uploads
        assert adapter_id == "ok" and path == service.store.job_dir(job_id) / "adapter"
        assert metadata["job_id"] == job_id and metadata["base_model"] == "base"
        assert metadata["quantization"] == "none" and metadata["metrics"] == job["metrics"]
        assert metadata["config"]["learning_rate"] == 1e-3
        assert service.get(job_id, OPEN).to_dict() == job

    run(tmp_path, scenario)


def test_a_worker_error_fails_the_job_with_its_message_and_the_next_job_runs(tmp_path: Path) -> None:
    async def scenario(service: TrainerService, server: FakeServer) -> None:
        failing = await submit(service, tmp_path, "fails")
        crashing = await submit(service, tmp_path, "crash")
        following = await submit(service, tmp_path, "ok")
        job = await ended(service, failing)
        assert job["status"] == "failed" and job["error"] == "every training prompt is too long"
        job = await ended(service, crashing)
        assert job["status"] == "failed"
        assert "exited with status 3" in job["error"] and "Traceback: something broke" in job["error"]
        assert (await ended(service, following))["status"] == "succeeded"
        assert [u[0] for u in server.uploads] == ["ok"]

    run(tmp_path, scenario)


def test_a_killed_worker_fails_its_job_and_the_next_job_runs(tmp_path: Path) -> None:
    async def scenario(service: TrainerService, server: FakeServer) -> None:
        victim = await submit(service, tmp_path, "slow")
        following = await submit(service, tmp_path, "ok")
        await started(service, victim)
        pid = service.get(victim, OPEN).worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        job = await ended(service, victim)
        assert job["status"] == "failed" and "killed by SIGKILL" in job["error"]
        assert (await ended(service, following))["status"] == "succeeded"

    run(tmp_path, scenario)


def test_cancel_a_running_and_a_queued_job_then_the_next_one_runs(tmp_path: Path) -> None:
    async def scenario(service: TrainerService, server: FakeServer) -> None:
        running = await submit(service, tmp_path, "slow")
        queued = await submit(service, tmp_path, "ok-never")
        following = await submit(service, tmp_path, "ok")
        assert (await service.cancel(queued, OPEN)).status == "cancelled"
        await started(service, running)
        await service.cancel(running, OPEN)
        job = await ended(service, running)
        assert job["status"] == "cancelled" and job["error"] is None
        assert (await ended(service, following))["status"] == "succeeded"
        assert [u[0] for u in server.uploads] == ["ok"]
        again = await service.cancel(running, OPEN)  # cancelling an ended job changes nothing
        assert again.status == "cancelled"

    run(tmp_path, scenario)


def test_the_server_refusing_the_adapter_or_serving_another_model_fails_the_job(tmp_path: Path) -> None:
    async def scenario(service: TrainerService, server: FakeServer) -> None:
        refused = await submit(service, tmp_path, "ok-refused")
        job = await ended(service, refused)
        assert job["status"] == "failed" and "uploading the adapter failed" in job["error"]
        assert "422" in job["error"]
        too_big = await submit(service, tmp_path, "ok-big", rank=128)
        job = await ended(service, too_big)
        assert job["status"] == "failed" and "--max-rank 64" in job["error"]
        server.model_id = "another-model"
        job = await ended(service, await submit(service, tmp_path, "ok-other"))
        assert job["status"] == "failed" and "another-model" in job["error"]

    run(tmp_path, scenario)


def test_an_unreachable_server_is_checked_again_at_upload(tmp_path: Path) -> None:
    async def scenario(service: TrainerService, server: FakeServer) -> None:
        job = await ended(service, await submit(service, tmp_path, "ok"))
        assert job["status"] == "failed" and "cannot reach" in job["error"]

    run(tmp_path, scenario, FakeServer(reachable=False))


def test_submission_validates_data_ownership_and_unknown_jobs(tmp_path: Path) -> None:
    async def scenario(service: TrainerService, server: FakeServer) -> None:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "q", "completion": "a"}\nnot json\n{"prompt": "q"}\n')
        config = JobConfig.from_dict({"adapter_id": "x", "method": "lora"})
        with pytest.raises(InvalidData, match=r"line 2: not valid JSON.*line 3: \"completion\" is missing"):
            await service.submit(config, bad, None, OPEN)
        with pytest.raises(InvalidData, match="at least two examples"):
            await service.submit(config, data_file(tmp_path, lines=1), None, OPEN)
        tenant = Principal("admin", "acme")
        with pytest.raises(Forbidden):
            await service.submit(config, data_file(tmp_path), None, tenant)
        with pytest.raises(JobNotFound):
            service.get("job-nope", OPEN)
        assert service.list_jobs(OPEN) == []
        own = JobConfig.from_dict({"adapter_id": "acme/x", "method": "lora", "max_steps": 1})
        job = await service.submit(own, data_file(tmp_path), data_file(tmp_path, "eval.jsonl"), tenant)
        assert (service.store.job_dir(job.id) / "eval_data.jsonl").exists()
        assert [j.id for j in service.list_jobs(tenant)] == [job.id]
        assert service.list_jobs(Principal("user", "other")) == []
        with pytest.raises(JobNotFound):
            service.get(job.id, Principal("user", "other"))

    run(tmp_path, scenario)
