"""Job persistence in --work-dir: atomic job files, reload after a restart (running -> failed, queued stays
queued and runs first), a stray worker of a killed trainer killed on restart, half-written submissions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adapterd.server.common.auth import OPEN
from adapterd.server.trainer.jobs import (
    INTERRUPTED,
    MAX_CURVE_POINTS,
    Job,
    JobStore,
    WorkDirInUse,
    new_job_id,
    utc_now,
)
from adapterd.server.trainer.service import Base, TrainerService


def make_job(store: JobStore, seq: int, status: str = "queued", **fields: object) -> Job:
    job = Job(new_job_id(), seq, f"adapter-{seq}", "lora", {"rank": 8}, utc_now(), status=status)
    for name, value in fields.items():
        setattr(job, name, value)
    with store.create(job) as job_dir:
        (job_dir / "data.jsonl").write_text("{}\n")
    return job


def test_jobs_persist_across_a_restart(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = make_job(store, 1)
    job.progress["step"] = 3
    job.metrics = {"base": {"exact_match": 0.5}}
    store.save(job)
    store.close()
    [loaded] = JobStore(tmp_path).load()
    assert loaded == job
    assert (store.job_dir(job.id) / "data.jsonl").read_text() == "{}\n"
    assert not list(store.job_dir(job.id).glob(".*.tmp"))


def test_restart_fails_the_running_job_and_keeps_the_queue_in_order(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    done = make_job(store, 1, "succeeded")
    running = make_job(store, 2, "running", started_at=utc_now())
    second = make_job(store, 4)
    first = make_job(store, 3)
    store.close()
    restarted = JobStore(tmp_path)
    jobs = {job.id: job for job in restarted.load()}
    assert jobs[running.id].status == "failed" and jobs[running.id].error == INTERRUPTED
    assert jobs[running.id].finished_at
    assert jobs[done.id].status == "succeeded"
    assert jobs[first.id].status == jobs[second.id].status == "queued"
    restarted.close()
    reopened = JobStore(tmp_path)
    assert reopened.load()[1].status == "failed"  # the change was saved
    service = TrainerService(reopened, Base("base", tmp_path, "cpu", "float32"), None)  # type: ignore[arg-type]
    assert list(service.queue) == [first.id, second.id]
    assert [job.id for job in service.list_jobs(OPEN)] == [second.id, first.id, running.id, done.id]


def test_restart_kills_a_stray_worker_of_the_running_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = make_job(store, 1, "running")
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(store.job_dir(job.id))]
    )
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        job.worker_pid = stray.pid
        store.save(job)
        other = make_job(store, 2, "running", worker_pid=unrelated.pid)  # not its worker: left alone
        store.close()
        JobStore(tmp_path).load()
        assert stray.wait(timeout=10) == -9
        assert unrelated.poll() is None
        assert other.worker_pid == unrelated.pid
    finally:
        stray.kill()
        unrelated.kill()
        stray.wait()
        unrelated.wait()


def test_a_half_written_submission_is_not_a_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = Job(new_job_id(), 1, "x", "lora", {}, utc_now())
    with pytest.raises(OSError, match="disk full"), store.create(job) as job_dir:
        (job_dir / "data.jsonl").write_text("{}\n")
        raise OSError("disk full")
    store.close()
    assert JobStore(tmp_path).load() == []
    assert not store.job_dir(job.id).exists()
    assert list(store.tmp.iterdir()) == []


def test_one_trainer_per_work_dir(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    with pytest.raises(WorkDirInUse, match="another trainer"):
        JobStore(tmp_path)
    store.close()
    JobStore(tmp_path).close()


def test_the_loss_curve_keeps_every_report_then_thins_to_its_shape(tmp_path: Path) -> None:
    job = make_job(JobStore(tmp_path), 1)
    for step in range(1, MAX_CURVE_POINTS + 1):
        job.record_progress({"step": step, "total_steps": 5000, "loss": 1.0 / step})
    assert [s for s, _ in job.loss_curve] == list(range(1, MAX_CURVE_POINTS + 1))  # one point per report
    assert job.progress["step"] == MAX_CURVE_POINTS
    job.record_progress({"step": MAX_CURVE_POINTS + 1, "total_steps": 5000, "loss": 0.0})
    steps = [s for s, _ in job.loss_curve]
    # Over the cap: every other point, the first and the latest kept, in order; and it fits again.
    assert steps[0] == 1 and steps[-1] == MAX_CURVE_POINTS + 1 and steps == sorted(steps)
    assert len(steps) <= MAX_CURVE_POINTS // 2 + 2
    assert job.loss_curve[-1] == [MAX_CURVE_POINTS + 1, 0.0]
