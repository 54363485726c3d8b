"""The trainer's job runner with a scripted worker (no model): success and upload with metadata, events in
order, a worker error, a crash, a kill -9, cancellation (queued, running, before start), refusals from the
server, the register_if gate passing and refusing, shipped tasks, and that the next job always runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tarfile
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from adapterd.server.common.auth import OPEN, Principal
from adapterd.server.common.errors import Forbidden, InvalidRequest
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
    final = dict(base=scores, adapter=dict(scores, exact_match=1.0))
    if config["eval_tasks"]:  # lm-eval results: the named task, and a subtask of it
        shipped = os.path.isfile(os.path.join(job_dir, "tasks", "t.yaml"))
        def results(acc):
            return {"t": {"alias": "t", "acc,none": acc, "acc_stderr,none": 0.1}, "t_sub": {"acc,none": acc}}
        final["tasks"] = {"base": results(0.25), "adapter": results(0.5 if shipped else 0.0)}
    emit("metrics", **final)
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


TASK_YAML = """\
task: t
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/t.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def tasks_archive(tmp_path: Path, files: dict[str, str], name: str = "tasks.tar.gz") -> Path:
    """A gzip tar of `files` (archive path -> text) under one top-level directory."""
    source = tmp_path / f"{name}-source"
    for path, text in files.items():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text(text)
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="my-tasks")
    return archive


async def submit_gated(service: TrainerService, tmp_path: Path, adapter_id: str, gate: dict[str, Any]) -> str:
    config = JobConfig.from_dict(
        {"adapter_id": adapter_id, "method": "lora", "eval_tasks": ["t"], "register_if": gate}
    )
    archive = tasks_archive(
        tmp_path, {"t.yaml": TASK_YAML, "data/t.jsonl": '{"question": "q"}\n'}, adapter_id
    )
    job = await service.submit(config, data_file(tmp_path), None, OPEN, archive)
    return job.id


def test_register_if_registers_an_adapter_that_beats_the_base_and_rejects_one_that_does_not(
    tmp_path: Path,
) -> None:
    async def scenario(service: TrainerService, server: FakeServer) -> None:
        passing = await submit_gated(
            service, tmp_path, "ok-pass", {"task": "t", "metric": "acc", "min_delta": 0.25}
        )
        refused = await submit_gated(
            service, tmp_path, "ok-refuse", {"task": "t", "metric": "acc", "min_delta": 0.3}
        )
        typo = await submit_gated(service, tmp_path, "ok-typo", {"task": "t", "metric": "f1", "min_delta": 0})
        held_out = await submit(
            service, tmp_path, "ok-held", register_if={"task": "held_out", "metric": "exact_match"}
        )

        job = await ended(service, passing)
        assert job["status"] == "succeeded" and job["error"] is None
        gate = job["metrics"]["gate"]
        assert gate == {
            "task": "t",
            "metric": "acc,none",
            "base": 0.25,
            "adapter": 0.5,
            "delta": 0.25,
            "min_delta": 0.25,
            "passed": True,
        }
        assert job["metrics"]["tasks"]["adapter"]["t"]["acc,none"] == 0.5
        assert (service.store.job_dir(passing) / "tasks" / "t.yaml").read_text() == TASK_YAML
        [(adapter_id, _, metadata)] = server.uploads
        assert adapter_id == "ok-pass" and metadata["metrics"]["gate"] == gate
        # The metadata keeps the named task, not the subtasks (a group like MMLU has 57).
        assert (
            set(metadata["metrics"]["tasks"]["base"]) == {"t"} and "t_sub" in job["metrics"]["tasks"]["base"]
        )

        job = await ended(service, refused)
        assert job["status"] == "rejected" and job["adapter"] is None
        assert job["error"] == (
            "not registered: on t, acc,none is 0.5000 for the adapter and 0.2500 for the base model "
            "(delta +0.2500); register_if asks for min_delta +0.3000"
        )
        assert job["metrics"]["gate"]["passed"] is False

        job = await ended(service, typo)
        assert job["status"] == "failed"
        assert job["error"] == "register_if: t does not report 'f1'; it reports acc,none"

        job = await ended(service, held_out)
        assert job["status"] == "succeeded" and job["metrics"]["gate"]["delta"] == 1.0
        assert [u[0] for u in server.uploads] == ["ok-pass", "ok-held"]

    run(tmp_path, scenario)


def test_shipped_tasks_are_checked_at_submission(tmp_path: Path) -> None:
    async def scenario(service: TrainerService, server: FakeServer) -> None:
        def config(**values: Any) -> JobConfig:
            return JobConfig.from_dict({"adapter_id": "x", "method": "lora", "eval_tasks": ["t"], **values})

        good = {"t.yaml": TASK_YAML, "data/t.jsonl": "{}\n"}
        cases = [
            (
                {"t.yaml": TASK_YAML, "utils.py": "import os"},
                "'my-tasks/utils.py': only task YAML and data files",
            ),
            (
                {"t.yaml": TASK_YAML + "process_docs: !function utils.process\n"},
                "t.yaml: invalid YAML: !function",
            ),
            ({"t.yaml": "task: t\noutput_type: [not, a, list\n"}, "t.yaml: invalid YAML"),
            ({"other.yaml": TASK_YAML.replace("task: t", "task: other")}, "unknown task 't'"),
        ]
        for i, (files, message) in enumerate(cases):
            with pytest.raises(InvalidRequest, match=message):
                await service.submit(
                    config(), data_file(tmp_path), None, OPEN, tasks_archive(tmp_path, files, f"a{i}")
                )
        not_tar = tmp_path / "not.tar"
        not_tar.write_text("hello")
        with pytest.raises(InvalidRequest, match="tasks: not a readable tar archive"):
            await service.submit(config(), data_file(tmp_path), None, OPEN, not_tar)
        with pytest.raises(InvalidRequest, match=r"config\.eval_tasks: tasks were shipped"):
            plain = JobConfig.from_dict({"adapter_id": "x", "method": "lora"})
            await service.submit(plain, data_file(tmp_path), None, OPEN, tasks_archive(tmp_path, good, "b"))
        assert service.list_jobs(OPEN) == []  # nothing was queued
        assert not list(service.store.root.iterdir())

    run(tmp_path, scenario)
