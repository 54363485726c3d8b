"""`adapterd trainer` end to end: real server and trainer processes on loopback.

The synthetic task: rewrite an ISO date as a "ledger" date, 2024-03-07 -> 07.03.2024. The default model
cannot guess this format (it echoes the ISO date and rambles), and an adapter learns it in a few dozen
steps. A `lora` job (chat data, over HTTP) and a `prompt_tuning` job (plain prompts, over gRPC) each must
beat the base model's held-out exact match by a wide margin, and the server must then answer held-out
prompts correctly with each adapter, over HTTP and gRPC. Each of them waits behind a job that is cancelled
or whose worker is killed with SIGKILL mid-training. On a tiny random model served on an NF4 base: a `qlora`
job end to end, bad submissions, and a trainer killed with a job running and one queued, then restarted.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapterd.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from adapterd.clients import InvalidRequest, PermissionDenied, TrainerClient, Unauthorized
from adapterd.server.model.resolve import ResolvedModel
from adapterd.server.trainer.jobs import ENDED, INTERRUPTED
from adapterd.v1 import generation_pb2, generation_pb2_grpc, training_pb2, training_pb2_grpc
from tests.e2e import serving
from tests.reference import make_lora_adapter

TRAINER = (serving.ADAPTERD,)  # `adapterd trainer`
EVAL = (serving.ADAPTERD, "eval")  # `adapterd eval`
NUM_TRAIN, NUM_EVAL = 400, 40
LORA = {"adapter_id": "ledger-lora", "method": "lora", "max_steps": 24}
SOFT = {
    "adapter_id": "ledger-soft",
    "method": "prompt_tuning",
    "max_steps": 50,
    "prompt_tuning_init_text": "Rewrite the date as day.month.year:",
}
FOREVER = {"method": "lora", "max_steps": 100_000}


# -- the synthetic task -----------------------------------------------------------------------------------


def dates(count: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Distinct (year, month, day) triples: the first NUM_TRAIN train, the rest are held out."""
    rng, seen = random.Random(seed), set[tuple[int, int, int]]()
    while len(seen) < count:
        seen.add((rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)))
    return sorted(seen, key=lambda _: rng.random())


def ledger(date: tuple[int, int, int]) -> str:
    year, month, day = date
    return f"{day:02d}.{month:02d}.{year}"


def plain(date: tuple[int, int, int]) -> dict[str, Any]:
    year, month, day = date
    return {"prompt": f"Date: {year}-{month:02d}-{day:02d}\nLedger:", "completion": f" {ledger(date)}"}


def chat(date: tuple[int, int, int]) -> dict[str, Any]:
    year, month, day = date
    question = {"role": "user", "content": f"Ledger date for {year}-{month:02d}-{day:02d}"}
    return {"messages": [question, {"role": "assistant", "content": ledger(date)}]}


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


ALL_DATES = dates(NUM_TRAIN + NUM_EVAL)
TRAIN, HELD_OUT = ALL_DATES[:NUM_TRAIN], ALL_DATES[NUM_TRAIN:]


# -- the trainer process ----------------------------------------------------------------------------------


@dataclass
class Trainer:
    process: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    work_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @functools.cached_property
    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")

    @property
    def training(self) -> training_pb2_grpc.TrainingStub:
        return training_pb2_grpc.TrainingStub(self.channel)

    def stop(self, sig_kill: bool = False) -> None:
        if "channel" in self.__dict__:
            self.channel.close()
        if self.process.poll() is None:
            self.process.kill() if sig_kill else self.process.terminate()
            self.process.wait(timeout=30)


def start_trainer(
    server: serving.Server,
    work_dir: Path,
    model: str,
    *args: str,
    env: dict[str, str] | None = None,
    http_port: int | None = None,
) -> Trainer:
    http_port, grpc_port = http_port or serving.free_port(), serving.free_port()
    log = work_dir / f"trainer-{http_port}.log"
    command = [
        *TRAINER,
        "trainer",
        *("--server", server.url, "--model", model, "--device", "cpu", "--work-dir", str(work_dir)),
        *("--http-port", str(http_port), "--grpc-port", str(grpc_port), *args),
    ]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
    trainer = Trainer(process, http_port, grpc_port, work_dir, log)
    serving.wait_healthy(trainer, "trainer", 120)
    return trainer


@contextmanager
def running_trainer(
    server: serving.Server, work_dir: Path, model: str, *args: str, env: dict[str, str] | None = None
) -> Iterator[Trainer]:
    trainer = start_trainer(server, work_dir, model, *args, env=env)
    try:
        yield trainer
    finally:
        trainer.stop()


# -- talking to it ----------------------------------------------------------------------------------------


def submit_http(
    trainer: Trainer,
    config: dict[str, Any],
    data: bytes,
    eval_data: bytes | None = None,
    key: str | None = None,
) -> httpx.Response:
    files = {"data": ("data.jsonl", data)}
    if eval_data is not None:
        files["eval_data"] = ("eval.jsonl", eval_data)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"{trainer.url}/v1/training/jobs"
    return httpx.post(url, data={"config": json.dumps(config)}, files=files, headers=headers, timeout=60)


def submit_grpc(trainer: Trainer, config: training_pb2.JobConfig, data: bytes, eval_data: bytes = b""):
    parts = [training_pb2.SubmitJobRequest(config=config)]
    parts += [training_pb2.SubmitJobRequest(data_chunk=data[i : i + 4096]) for i in range(0, len(data), 4096)]
    if eval_data:
        parts.append(training_pb2.SubmitJobRequest(eval_data_chunk=eval_data))
    return trainer.training.SubmitJob(iter(parts), timeout=60)


def sse_events(trainer: Trainer, job_id: str) -> Iterator[dict[str, Any]]:
    """The job's SSE events ({"type", "job"}) until the stream ends."""
    url = f"{trainer.url}/v1/training/jobs/{job_id}/events"
    with httpx.stream("GET", url, timeout=httpx.Timeout(600, connect=10)) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                yield json.loads(line.removeprefix("data: "))


def is_training(job: dict[str, Any]) -> bool:
    return job["phase"] == "training" and job["progress"]["step"] >= 1


def worker_pid(trainer: Trainer, job_id: str) -> int:
    pid = json.loads((trainer.work_dir / "jobs" / job_id / "job.json").read_text())["worker_pid"]
    assert isinstance(pid, int)
    return pid


def is_alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def wait_until(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def get_job(trainer: Trainer, job_id: str, key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{trainer.url}/v1/training/jobs/{job_id}", headers=headers, timeout=10)
    assert response.status_code == 200
    return response.json()


def wait_for_end(trainer: Trainer, job_id: str, timeout: float = 300) -> dict[str, Any]:
    wait_until(lambda: get_job(trainer, job_id)["status"] in ENDED, timeout)
    return get_job(trainer, job_id)


def assert_learned(job: dict[str, Any]) -> None:
    base, adapter = job["metrics"]["base"], job["metrics"]["adapter"]
    assert base["exact_match"] <= 0.1, base
    assert adapter["exact_match"] >= 0.8, adapter
    assert adapter["exact_match"] - base["exact_match"] >= 0.6
    assert adapter["rougeL"] > base["rougeL"]


def check_progress(events: list[dict[str, Any]], total_steps: int) -> None:
    steps = [e["job"]["progress"] for e in events if e["type"] == "progress" and e["job"]["progress"]["step"]]
    assert steps and steps[-1]["step"] == steps[-1]["total_steps"] == total_steps
    assert [p["step"] for p in steps] == sorted(p["step"] for p in steps)
    assert all(p["loss"] > 0 and p["learning_rate"] > 0 and p["tokens_per_second"] > 0 for p in steps)
    assert steps[-1]["eta_seconds"] == 0 and any(p["eta_seconds"] > 0 for p in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]


# -- the default model: lora and prompt tuning --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(
    default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[serving.Server]:
    root = tmp_path_factory.mktemp("trainer-server")
    with serving.running_server("default", root / "store", root / "server.log", "--max-rank", "16") as server:
        yield server


@pytest.fixture(scope="module")
def trainer(server: serving.Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainer]:
    work_dir = tmp_path_factory.mktemp("trainer-work")
    with running_trainer(server, work_dir, "default", "--server-grpc", server.grpc_target) as trainer:
        yield trainer


@pytest.mark.slow
def test_lora_job_over_http_after_a_cancelled_one(server: serving.Server, trainer: Trainer) -> None:
    data, eval_data = jsonl([chat(d) for d in TRAIN]), jsonl([chat(d) for d in HELD_OUT])
    two = jsonl([chat(d) for d in HELD_OUT[:2]])
    doomed = submit_http(trainer, {"adapter_id": "doomed", **FOREVER}, data, two)
    submitted = submit_http(trainer, LORA, data, eval_data)
    assert doomed.status_code == submitted.status_code == 202
    doomed_id, job_id = doomed.json()["id"], submitted.json()["id"]
    assert submitted.json()["status"] == "queued" and submitted.json()["config"]["rank"] == 8

    cancelled = None
    for event in sse_events(trainer, doomed_id):  # cancel it mid-training; the stream ends with it
        if cancelled is None and is_training(event["job"]):
            cancelled = httpx.post(f"{trainer.url}/v1/training/jobs/{doomed_id}/cancel", timeout=10)
            assert cancelled.status_code == 200
    assert event["job"]["status"] == "cancelled" and event["job"]["error"] is None
    wait_until(lambda: not is_alive(worker_pid(trainer, doomed_id)), timeout=20)

    events, phase_started = [], {}
    for event in sse_events(trainer, job_id):
        events.append(event)
        phase_started.setdefault(event["job"]["phase"], time.monotonic())
    job = events[-1]["job"]
    assert job["status"] == "succeeded", job["error"]
    check_progress(events, total_steps=24)
    assert_learned(job)
    assert job["num_eval_examples"] == NUM_EVAL and job["num_train_examples"] == NUM_TRAIN
    training_s = phase_started["evaluating_adapter"] - phase_started["training"]
    print(
        "lora:",
        json.dumps(job["metrics"]),
        f"training {training_s:.0f} s;",
        job["started_at"],
        job["finished_at"],
    )

    # The server has it now (uploaded over gRPC, with metadata), and answers held-out prompts with it.
    adapter = httpx.get(f"{server.url}/v1/adapters/ledger-lora", timeout=10).json()
    assert adapter["type"] == "lora" and adapter["rank"] == 8
    metadata = adapter["metadata"]
    assert metadata["job_id"] == job_id and metadata["base_model"] == "SmolLM2-135M-Instruct"
    assert metadata["quantization"] == "none" and metadata["method"] == "lora"
    assert metadata["metrics"]["adapter"]["exact_match"] == job["metrics"]["adapter"]["exact_match"]
    assert job["adapter"]["size_bytes"] == adapter["size_bytes"] and job["adapter"]["rank"] == 8
    generation = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(server.grpc_target))
    for date in HELD_OUT[:5]:
        messages = chat(date)["messages"][:1]
        body = {"model": "ledger-lora", "messages": messages, "temperature": 0, "max_tokens": 16}
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["message"]["content"] == ledger(date)
        request = generation_pb2.GenerateRequest(
            messages=generation_pb2.ChatMessages(
                messages=[generation_pb2.ChatMessage(**m) for m in messages]
            ),
            adapter_id="ledger-lora",
            parameters=generation_pb2.GenerationParameters(max_new_tokens=16),
        )
        assert generation.Generate(request, timeout=60).text == ledger(date)

    # The same evaluation on its own, through the server: the endpoint and `adapterd eval` agree with the job.
    files = {"data": ("eval.jsonl", eval_data)}
    scores = httpx.post(
        f"{trainer.url}/v1/evaluations", data={"adapter_id": "ledger-lora"}, files=files, timeout=300
    ).json()
    assert scores["num_examples"] == NUM_EVAL and scores["adapter_id"] == "ledger-lora"
    assert abs(scores["exact_match"] - job["metrics"]["adapter"]["exact_match"]) <= 0.05
    few = trainer.work_dir / "few.jsonl"  # the base model, from the command line
    few.write_bytes(jsonl([chat(d) for d in HELD_OUT[:8]]))
    cli = subprocess.run(
        [*EVAL, "--server", server.url, "--data", str(few), "--out", str(few.with_suffix(".out")), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    base_scores = json.loads(cli.stdout)
    assert base_scores["adapter_id"] is None and base_scores["num_examples"] == 8
    assert base_scores["exact_match"] <= 0.1
    assert len(few.with_suffix(".out").read_text().splitlines()) == 8
    table = subprocess.run(
        [*EVAL, "--server", server.url, "--data", str(few)], capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr
    rows = dict(line.split(None, 1) for line in table.stdout.splitlines())  # without --json: one score a line
    assert rows["adapter_id"] == "(the base model)" and rows["num_examples"] == "8"
    assert rows["exact_match"] == f"{base_scores['exact_match']:.4f}"


@pytest.mark.slow
def test_prompt_tuning_job_over_grpc_after_a_killed_one(server: serving.Server, trainer: Trainer) -> None:
    data = jsonl([plain(d) for d in TRAIN])  # no eval file: the trainer holds out 10%
    two = jsonl([plain(d) for d in HELD_OUT[:2]])
    doomed = submit_grpc(trainer, training_pb2.JobConfig(adapter_id="doomed-too", **FOREVER), data, two)
    job = submit_grpc(trainer, training_pb2.JobConfig(**SOFT), data)
    assert job.status == "queued" and job.method == "prompt_tuning"

    stream = trainer.training.WatchJob(training_pb2.WatchJobRequest(id=doomed.id), timeout=300)
    for event in stream:
        if event.job.progress.step >= 1:
            os.kill(worker_pid(trainer, doomed.id), signal.SIGKILL)
            break
    events = list(stream)
    assert events[-1].type == "status" and events[-1].job.status == "failed"
    assert "killed by SIGKILL" in events[-1].job.error

    events = list(trainer.training.WatchJob(training_pb2.WatchJobRequest(id=job.id), timeout=600))
    done = events[-1].job
    assert done.status == "succeeded", done.error
    assert {"status", "progress", "metrics"} <= {e.type for e in events}
    assert done.progress.step == done.progress.total_steps == 50
    base, adapter = done.metrics.base, done.metrics.adapter
    print("prompt tuning metrics:", base, adapter, "took", done.started_at, done.finished_at)
    assert base.exact_match <= 0.1 and adapter.exact_match >= 0.8
    assert adapter.rouge_l > base.rouge_l
    assert get_job(trainer, job.id)["num_eval_examples"] == NUM_TRAIN // 10
    # The job's config has what applies to prompt tuning, not LoRA's rank, alpha and target modules.
    config = get_job(trainer, job.id)["config"]
    assert (
        config["num_virtual_tokens"] == 20
        and config["prompt_tuning_init_text"] == SOFT["prompt_tuning_init_text"]
    )
    assert not {"rank", "alpha", "target_modules"} & set(config)
    assert not done.config.HasField("rank") and not done.config.target_modules

    generation = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(server.grpc_target))
    for date in HELD_OUT[:5]:
        prompt = plain(date)["prompt"]
        body = {"inputs": prompt, "parameters": {"adapter_id": "ledger-soft", "max_new_tokens": 16}}
        answer = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
        assert answer["generated_text"] == f" {ledger(date)}"
        request = generation_pb2.GenerateRequest(
            prompt=prompt,
            adapter_id="ledger-soft",
            parameters=generation_pb2.GenerationParameters(max_new_tokens=16),
        )
        assert generation.Generate(request, timeout=60).text == f" {ledger(date)}"
    listed = trainer.training.ListJobs(training_pb2.ListJobsRequest()).jobs
    assert [j.id for j in listed[:2]] == [job.id, doomed.id]  # newest first


# -- a tiny random model on an NF4 base: qlora, bad submissions, restarts -----------------------------------


@pytest.fixture(scope="module")
def tiny_model(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(serving.make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), default_model.path))


@pytest.fixture(scope="module")
def tiny(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.Server]:
    root = tmp_path_factory.mktemp("trainer-tiny")
    with serving.running_server(
        tiny_model, root / "store", root / "server.log", "--quantize", "nf4"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_trainer(
    tiny: serving.Server, tiny_model: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Trainer]:
    with running_trainer(tiny, tmp_path_factory.mktemp("tiny-trainer-work"), tiny_model) as trainer:
        yield trainer


def test_qlora_job_serves_on_the_nf4_base(tiny: serving.Server, tiny_trainer: Trainer) -> None:
    config = {"adapter_id": "tiny-qlora", "method": "qlora", "max_steps": 4, "rank": 4}
    eval_records = [plain(d) for d in HELD_OUT[:4]]
    response = submit_http(tiny_trainer, config, jsonl([plain(d) for d in TRAIN[:40]]), jsonl(eval_records))
    assert response.status_code == 202, response.text
    job = wait_for_end(tiny_trainer, response.json()["id"], timeout=180)
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["base"]["num_examples"] == job["metrics"]["adapter"]["num_examples"] == 4
    info = httpx.get(f"{tiny.url}/info").json()
    assert info["quantize"] == "nf4"
    adapter = httpx.get(f"{tiny.url}/v1/adapters/tiny-qlora").json()
    assert adapter["type"] == "lora" and adapter["rank"] == 4 and adapter["version"] == 1
    assert job["adapter"]["sha256"] == adapter["sha256"]
    # Uploaded over HTTP (this trainer has no --server-grpc), with the job's metadata.
    metadata = adapter["metadata"]
    assert metadata["job_id"] == job["id"] and metadata["method"] == "qlora"
    assert metadata["base_model"] == info["model_id"] and metadata["quantization"] == "nf4"
    assert metadata["config"] == job["config"] and metadata["metrics"] == job["metrics"]
    assert job["adapter"]["metadata"] == metadata
    # gRPC GetJob answers every field the HTTP job has.
    described = tiny_trainer.training.GetJob(training_pb2.GetJobRequest(id=job["id"]))
    assert described.phase == "" and described.config.rank == 4 and described.config.max_steps == 4
    assert [[p.step, p.loss] for p in described.loss_curve] == job["loss_curve"] and job["loss_curve"]
    assert described.config.learning_rate == job["config"]["learning_rate"]
    assert not described.config.HasField("prompt_tuning_init_text")
    assert described.num_train_examples == 40 and described.num_eval_examples == 4
    assert described.metrics.adapter.num_examples == 4
    assert (
        described.adapter.sha256 == adapter["sha256"]
        and described.adapter.size_bytes == adapter["size_bytes"]
    )
    assert described.adapter.metadata["job_id"] == job["id"]
    # The server answers with the adapter what the job's evaluation generated on the same NF4 base.
    predictions = (tiny_trainer.work_dir / "jobs" / job["id"] / "predictions.jsonl").read_text().splitlines()
    matches = 0
    for record, line in zip(eval_records, predictions, strict=True):
        body = {"inputs": record["prompt"], "parameters": {"adapter_id": "tiny-qlora", "max_new_tokens": 27}}
        answer = httpx.post(f"{tiny.url}/generate", json=body, timeout=60)
        assert answer.status_code == 200
        matches += answer.json()["generated_text"] == json.loads(line)["prediction"]
    assert matches >= 3  # bitsandbytes' CPU kernels may flip a near-tie between batch shapes


MC_TASK = "ledger_mc"
MC_TASK_YAML = f"""\
task: {MC_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Date: {{{{iso}}}}\\nLedger:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""


def mc_task_dir(root: Path) -> Path:
    """A local multiple-choice task shipped with a job: which of four spellings is the ledger date. Its data
    path is relative to the directory, as a shipped task's must be."""
    records = []
    for i, (year, month, day) in enumerate(HELD_OUT[:8]):
        right = ledger((year, month, day))
        wrong = [  # as long as the right one, so that no choice wins by its length alone
            f"{month:02d}.{day:02d}.{year}",
            f"{day:02d}.{month:02d}.{year + 1}",
            f"{day:02d}/{month:02d}/{year}",
        ]
        choices = [*wrong[: i % 4], right, *wrong[i % 4 :]]
        records.append({"iso": f"{year}-{month:02d}-{day:02d}", "choices": choices, "answer": i % 4})
    (root / "data").mkdir(parents=True)
    (root / "data" / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / f"{MC_TASK}.yaml").write_text(MC_TASK_YAML)
    return root


def lm_eval_hf_accuracy(
    model: str, adapter: Path | None, task_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> float:
    """lm-eval's own scoring of the task: transformers, plus PEFT's adapter when given (fp32, CPU)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(task_dir)  # the task's data path is relative
    model_args = f"pretrained={model},dtype=float32,device=cpu" + (f",peft={adapter}" if adapter else "")
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=[MC_TASK], task_manager=manager)
    return float(out["results"][MC_TASK]["acc,none"])


def test_eval_tasks_gate_registration(
    tiny: serving.Server,
    tiny_trainer: Trainer,
    tiny_model: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job ships a local lm-eval task: a gate the adapter passes registers it, with lm-eval's scores for
    the base and the adapter equal to lm-eval's hf + peft; a gate it cannot pass (over gRPC) rejects it."""
    tasks = mc_task_dir(tmp_path / "tasks")
    data, held_out = [plain(d) for d in TRAIN[:40]], [plain(d) for d in HELD_OUT[:4]]
    config = {"method": "lora", "max_steps": 4, "rank": 4, "eval_tasks": [MC_TASK]}
    with TrainerClient(tiny_trainer.url, timeout=60) as client:
        gate = {"task": MC_TASK, "metric": "acc", "min_delta": -1.0}
        job = client.submit(
            {**config, "adapter_id": "tiny-gated", "register_if": gate}, data, held_out, tasks
        )
    job = wait_for_end(tiny_trainer, job["id"], timeout=240)
    assert job["status"] == "succeeded", job["error"]
    scores = job["metrics"]["tasks"]
    adapter_dir = tiny_trainer.work_dir / "jobs" / job["id"] / "adapter"
    for model, adapter in (("base", None), ("adapter", adapter_dir)):
        assert scores[model][MC_TASK]["acc,none"] == lm_eval_hf_accuracy(
            tiny_model, adapter, tasks, monkeypatch
        )
        assert "acc_stderr,none" in scores[model][MC_TASK] and 0 <= scores[model][MC_TASK]["ece,none"] <= 1
    outcome = job["metrics"]["gate"]
    assert outcome["passed"] and outcome["metric"] == "acc,none"
    assert outcome["delta"] == scores["adapter"][MC_TASK]["acc,none"] - scores["base"][MC_TASK]["acc,none"]
    metadata = httpx.get(f"{tiny.url}/v1/adapters/tiny-gated").json()["metadata"]
    assert metadata["metrics"]["tasks"] == scores and metadata["metrics"]["gate"] == outcome

    archive = tmp_path / "tasks.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tasks, arcname=".")
    gate_pb = training_pb2.RegisterIf(task=MC_TASK, metric="acc,none", min_delta=2.0)
    message = training_pb2.JobConfig(
        adapter_id="tiny-refused",
        method="lora",
        max_steps=4,
        rank=4,
        eval_tasks=[MC_TASK],
        register_if=gate_pb,
    )
    parts = [training_pb2.SubmitJobRequest(config=message)]
    parts += [training_pb2.SubmitJobRequest(data_chunk=jsonl(data))]
    parts += [training_pb2.SubmitJobRequest(tasks_chunk=archive.read_bytes())]
    submitted = tiny_trainer.training.SubmitJob(iter(parts), timeout=60)
    job = wait_for_end(tiny_trainer, submitted.id, timeout=240)
    assert job["status"] == "rejected" and job["adapter"] is None
    assert job["error"].startswith(f"not registered: on {MC_TASK}, acc,none is ")
    assert "register_if asks for min_delta +2.0000" in job["error"]
    assert httpx.get(f"{tiny.url}/v1/adapters/tiny-refused").status_code == 404
    described = tiny_trainer.training.GetJob(training_pb2.GetJobRequest(id=job["id"]))
    assert described.status == "rejected" and not described.metrics.gate.passed
    assert described.metrics.gate.min_delta == 2.0 and described.config.register_if.min_delta == 2.0
    assert (
        described.metrics.tasks["adapter"][MC_TASK]["acc,none"]
        == job["metrics"]["tasks"]["adapter"][MC_TASK]["acc,none"]
    )


def test_eval_tasks_are_refused_at_submission(tiny_trainer: Trainer, tmp_path: Path) -> None:
    """An unknown task, a broken shipped YAML, shipped code, and a gate on a task not evaluated: a clear 400,
    and no job."""
    good = [plain(d) for d in TRAIN[:4]]
    before = httpx.get(f"{tiny_trainer.url}/v1/training/jobs").json()["data"]
    broken = mc_task_dir(tmp_path / "broken")
    (broken / "bad.yaml").write_text("task: bad\noutput_type: [not, a, type\n")
    coded = mc_task_dir(tmp_path / "coded")
    (coded / "utils.py").write_text("import os\n")
    with TrainerClient(tiny_trainer.url, timeout=120) as client:
        for config, tasks, param, words in [
            (
                {"eval_tasks": ["no_such_task_anywhere"]},
                None,
                "config.eval_tasks",
                "unknown task 'no_such_task_anywhere'",
            ),
            ({"eval_tasks": [MC_TASK]}, broken, None, "tasks: bad.yaml: invalid YAML"),
            ({"eval_tasks": [MC_TASK]}, coded, None, "'utils.py': only task YAML and data files"),
            (
                {"eval_tasks": [MC_TASK], "register_if": {"task": "arc_easy", "metric": "acc"}},
                None,
                "config.register_if.task",
                "must be one of eval_tasks or held_out",
            ),
        ]:
            with pytest.raises(InvalidRequest, match=re.escape(words)) as caught:
                client.submit({"adapter_id": "x", "method": "lora", **config}, good, None, tasks)
            assert caught.value.param == param
    assert httpx.get(f"{tiny_trainer.url}/v1/training/jobs").json()["data"] == before


def evaluate_grpc(trainer: Trainer, adapter_id: str, data: bytes, header: bool = True) -> Any:
    parts = [training_pb2.EvaluateRequest(header=training_pb2.EvaluateHeader(adapter_id=adapter_id))]
    parts = parts if header else []
    parts += [training_pb2.EvaluateRequest(data_chunk=data[i : i + 4096]) for i in range(0, len(data), 4096)]
    return trainer.training.Evaluate(iter(parts), timeout=120)


def test_evaluate_over_grpc(
    tiny: serving.Server, tiny_trainer: Trainer, tiny_model: str, tmp_path: Path
) -> None:
    lora = make_lora_adapter(Path(tiny_model), tmp_path / "lora", r=4, alpha=8, target_modules="all-linear")
    files = {name: (name, (lora / name).read_bytes()) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    assert httpx.put(f"{tiny.url}/v1/adapters/tiny-eval", files=files, timeout=60).status_code in (200, 201)
    data = jsonl([plain(d) for d in HELD_OUT[:3]] + [chat(d) for d in HELD_OUT[3:5]])

    for adapter_id in ("", "tiny-eval"):
        evaluation = evaluate_grpc(tiny_trainer, adapter_id, data)
        assert evaluation.adapter_id == adapter_id and evaluation.scores.num_examples == 5
        scores = evaluation.scores
        assert all(0 <= v <= 1 for v in (scores.exact_match, scores.rouge1, scores.rouge2, scores.rouge_l))
    over_http = httpx.post(
        f"{tiny_trainer.url}/v1/evaluations",
        data={"adapter_id": "tiny-eval"},
        files={"data": ("eval.jsonl", data)},
        timeout=120,
    ).json()
    assert over_http["adapter_id"] == "tiny-eval" and over_http["num_examples"] == 5

    for adapter_id, body, header, code, words in [
        ("nope", data, True, grpc.StatusCode.NOT_FOUND, "nope"),
        (
            "",
            data.split(b"\n")[0] + b"\nnot json\n",
            True,
            grpc.StatusCode.INVALID_ARGUMENT,
            "line 2: not valid JSON",
        ),
        ("", b"[]\n", True, grpc.StatusCode.INVALID_ARGUMENT, "data: 1 invalid line: line 1"),
        ("", b"", True, grpc.StatusCode.INVALID_ARGUMENT, "no evaluation data"),
        ("", data, False, grpc.StatusCode.INVALID_ARGUMENT, "first message of Evaluate must be the header"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            evaluate_grpc(tiny_trainer, adapter_id, body, header)
        assert caught.value.code() == code and words in caught.value.details(), caught.value.details()


def test_bad_submissions_are_refused_with_the_reason(tiny_trainer: Trainer) -> None:
    good = jsonl([plain(d) for d in TRAIN[:4]])
    bad = good + b'{"prompt": "x"}\nnot json\n{"prompt": "x", "completion": ""}\n'
    response = submit_http(tiny_trainer, {"adapter_id": "x", "method": "lora"}, bad)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith("data: 3 invalid lines: line 5: ")
    assert "line 6: not valid JSON" in message and 'line 7: "completion" must not be empty' in message
    response = submit_http(tiny_trainer, {"adapter_id": "x", "method": "lora"}, good, b"[]\n")
    assert response.status_code == 400 and "eval_data: 1 invalid line: line 1" in response.text

    response = submit_http(tiny_trainer, {"adapter_id": "x", "method": "loha"}, good)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "config.method" and "unknown method 'loha'" in error["message"]
    response = submit_http(tiny_trainer, {"adapter_id": "x", "method": "lora", "rank": -1}, good)
    assert response.status_code == 400 and response.json()["error"]["param"] == "config.rank"

    for config, data, words in [
        (training_pb2.JobConfig(adapter_id="x", method="loha"), good, "unknown method 'loha'"),
        (training_pb2.JobConfig(adapter_id="x", method="lora"), bad, "line 6: not valid JSON"),
        (training_pb2.JobConfig(adapter_id="x", method="lora"), b"", "no training data"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            submit_grpc(tiny_trainer, config, data)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()

    assert httpx.get(f"{tiny_trainer.url}/v1/training/jobs/job-nope").status_code == 404
    assert httpx.get(f"{tiny_trainer.url}/v1/training/jobs/job-nope/events").status_code == 404
    with pytest.raises(grpc.RpcError) as caught:
        list(tiny_trainer.training.WatchJob(training_pb2.WatchJobRequest(id="job-nope")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    health = health_pb2_grpc.HealthStub(tiny_trainer.channel).Check(
        health_pb2.HealthCheckRequest(service="adapterd.v1.Training")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_restart_fails_the_running_job_and_runs_the_queued_one(
    tiny: serving.Server, tiny_model: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work_dir, model = tmp_path_factory.mktemp("restart-work"), tiny_model
    data, eval_data = jsonl([plain(d) for d in TRAIN[:20]]), jsonl([plain(d) for d in HELD_OUT[:2]])
    first = start_trainer(tiny, work_dir, model)
    try:
        running = submit_http(first, {"adapter_id": "interrupted", **FOREVER}, data, eval_data).json()["id"]
        queued = submit_http(
            first, {"adapter_id": "after-restart", "method": "qlora", "max_steps": 2}, data, eval_data
        )
        wait_until(lambda: is_training(get_job(first, running)), timeout=120)
        pid = worker_pid(first, running)
    finally:
        first.stop(sig_kill=True)
    wait_until(lambda: not is_alive(pid), timeout=20)  # the worker dies with its trainer

    with running_trainer(tiny, work_dir, model) as second:
        job = get_job(second, running)
        assert job["status"] == "failed" and job["error"] == INTERRUPTED
        job = wait_for_end(second, queued.json()["id"], timeout=180)
        assert job["status"] == "succeeded", job["error"]
        assert httpx.get(f"{tiny.url}/v1/adapters/after-restart").status_code == 200


def test_keys_on_the_server_and_on_the_trainer(
    tiny_model: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("keyed")
    keys = root / "keys.txt"
    keys.write_text("adminkey admin\nuserkey user\n")
    key_args = ("--api-keys", str(keys))
    with (
        serving.running_server(tiny_model, root / "store", root / "server.log", *key_args) as server,
        running_trainer(server, root, tiny_model, *key_args, env={"ADAPTERD_API_KEY": "adminkey"}) as trainer,
    ):
        data, eval_data = jsonl([plain(d) for d in TRAIN[:20]]), jsonl([plain(d) for d in HELD_OUT[:2]])
        config = {"adapter_id": "keyed", "method": "lora", "max_steps": 1}
        assert httpx.get(f"{trainer.url}/v1/training/jobs").status_code == 401
        assert submit_http(trainer, config, data, eval_data, key="userkey").status_code == 403
        with pytest.raises(grpc.RpcError) as caught:
            trainer.training.ListJobs(training_pb2.ListJobsRequest())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The Python clients raise the same typed errors (ADAPTERD_API_KEY is unset in this process).
        with TrainerClient(trainer.url) as anonymous, pytest.raises(Unauthorized):
            anonymous.list()
        with TrainerClient(trainer.url, api_key="userkey") as user, pytest.raises(PermissionDenied):
            user.submit(config, [plain(d) for d in TRAIN[:20]])
        response = submit_http(trainer, config, data, eval_data, key="adminkey")
        assert response.status_code == 202
        wait_until(lambda: get_job(trainer, response.json()["id"], "adminkey")["status"] in ENDED, 180)
        job = get_job(trainer, response.json()["id"], "adminkey")
        assert job["status"] == "succeeded", job["error"]  # uploaded with the trainer's admin key
        shown = httpx.get(f"{server.url}/v1/adapters/keyed", headers={"Authorization": "Bearer userkey"})
        assert shown.status_code == 200 and shown.json()["version"] == 1
