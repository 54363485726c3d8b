"""TrainerClient, AsyncTrainerClient and `adapterd train submit|status|cancel|list` against a real
`adapterd trainer` and `adapterd serve` on loopback, on a tiny random chat model (fast LoRA jobs): submit,
watch to the end, get, list, cancel, evaluate, and the typed errors, as a user of the clients sees them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapterd.clients import (
    AdapterNotFound,
    AsyncTrainerClient,
    Client,
    InvalidRequest,
    JobNotFound,
    TrainerClient,
)
from adapterd.server.model.resolve import ResolvedModel
from tests.e2e import serving
from tests.e2e.test_client_cli import adapterd, fails, succeeds, table
from tests.e2e.test_clients import DOCS, python_blocks, run_blocks
from tests.e2e.test_trainer import FOREVER, HELD_OUT, TRAIN, Trainer, jsonl, plain, running_trainer

STEPS = 3
TRAIN_RECORDS = [plain(d) for d in TRAIN[:24]]
EVAL_RECORDS = [plain(d) for d in HELD_OUT[:3]]
SCORES = {"exact_match", "rouge1", "rouge2", "rougeL", "num_examples"}


@pytest.fixture(scope="module")
def tiny_model(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serving.make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), default_model.path)


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.Server]:
    root = tmp_path_factory.mktemp("trainer-clients-server")
    with serving.running_server(tiny_model, root / "store", root / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def trainer(
    server: serving.Server, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Trainer]:
    with running_trainer(server, tmp_path_factory.mktemp("trainer-clients-work"), str(tiny_model)) as trainer:
        yield trainer


def lora_config(adapter_id: str) -> dict[str, Any]:
    return {"adapter_id": adapter_id, "method": "lora", "max_steps": STEPS, "rank": 4}


def check_watched(jobs: list[dict[str, Any]]) -> None:
    """`watch` yields the job after each change, its steps in order, until it has succeeded."""
    steps = [job["progress"]["step"] for job in jobs]
    assert steps == sorted(steps) and steps[-1] == jobs[-1]["progress"]["total_steps"] == STEPS
    assert [job["status"] for job in jobs].count("succeeded") == 1 and jobs[-1]["status"] == "succeeded"


def test_trainer_client_end_to_end(server: serving.Server, trainer: Trainer) -> None:
    with TrainerClient(trainer.url) as client:
        job = client.submit(lora_config("client-lora"), TRAIN_RECORDS, EVAL_RECORDS)
        assert job["status"] in ("queued", "running") and job["adapter_id"] == "client-lora"
        check_watched(list(client.watch(job["id"])))

        done = client.get(job["id"])
        assert done["status"] == "succeeded" and done["error"] is None
        assert done["metrics"]["base"].keys() >= SCORES and done["metrics"]["adapter"]["num_examples"] == 3
        assert [j["id"] for j in client.list()] == [job["id"]]
        assert list(client.watch(job["id"]))[-1]["status"] == "succeeded"  # an ended job: its last state

        scores = client.evaluate(EVAL_RECORDS, adapter_id="client-lora")
        assert scores.keys() >= SCORES and scores["num_examples"] == 3
        assert all(0 <= scores[name] <= 1 for name in SCORES - {"num_examples"})
        assert client.evaluate(EVAL_RECORDS)["adapter_id"] is None  # the base model
    with Client(server.url) as server_client:
        assert server_client.get_adapter("client-lora").rank == 4
        assert server_client.generate(EVAL_RECORDS[0]["prompt"], adapter_id="client-lora").text is not None


def test_trainer_client_errors(trainer: Trainer, tmp_path: Path) -> None:
    with TrainerClient(trainer.url) as client:
        before = client.list()
        for call in (client.get, client.cancel, lambda job_id: list(client.watch(job_id))):
            with pytest.raises(JobNotFound):
                call("no-such-job")
        with pytest.raises(InvalidRequest, match="method"):
            client.submit({"adapter_id": "bad", "method": "loha"}, TRAIN_RECORDS)
        with pytest.raises(InvalidRequest, match="line 2"):
            client.submit(lora_config("bad"), [TRAIN_RECORDS[0], "not json"])
        with pytest.raises(AdapterNotFound):
            client.evaluate(EVAL_RECORDS, adapter_id="no-such-adapter")
        with pytest.raises(FileNotFoundError):
            client.submit(lora_config("bad"), tmp_path / "missing.jsonl")
        assert client.list() == before  # nothing was queued


def test_async_trainer_client_cancels_a_running_job(trainer: Trainer) -> None:
    async def scenario() -> None:
        async with AsyncTrainerClient(trainer.url) as client:
            job = await client.submit({**FOREVER, "adapter_id": "async-forever"}, TRAIN_RECORDS)
            async for seen in client.watch(job["id"]):
                if seen["status"] == "running" and seen["progress"]["step"] >= 1:
                    break
            cancelled = await client.cancel(job["id"])
            assert cancelled["status"] == "cancelled"
            assert (await client.get(job["id"]))["status"] == "cancelled"
            assert job["id"] in [j["id"] for j in await client.list()]
            with pytest.raises(JobNotFound):
                await client.get("no-such-job")

    asyncio.run(asyncio.wait_for(scenario(), timeout=180))


# -- `adapterd train` ---------------------------------------------------------------------------------------


def test_train_commands(server: serving.Server, trainer: Trainer, tmp_path: Path) -> None:
    env = {"ADAPTERD_TRAINER_URL": trainer.url}
    data, eval_data = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_bytes(jsonl(TRAIN_RECORDS))
    eval_data.write_bytes(jsonl(EVAL_RECORDS))
    files = ("--data", str(data), "--eval-data", str(eval_data))

    # submit --watch: one progress line per change (stdout is not a terminal), then the job's details.
    out = succeeds(
        "train",
        "submit",
        *files,
        "--adapter-id",
        "cli-lora",
        "--method",
        "lora",
        "--max-steps",
        str(STEPS),
        "--rank",
        "4",
        "--watch",
        env=env,
    )
    bars = [line for line in out.splitlines() if line.startswith("[")]
    assert bars[-1].startswith(f"[{'#' * 30}]  100%  step {STEPS}/{STEPS}  loss ") and "succeeded" in bars[-1]
    details = dict(line.split(None, 1) for line in out.splitlines()[len(bars) :])
    assert details["status"] == "succeeded" and details["adapter_id"] == "cli-lora"
    assert details["metrics.adapter"].startswith("exact_match ")
    # One field a line (not a long JSON line); counts as the integers they are.
    assert details["config.rank"] == "4" and details["config.method"] == "lora"
    assert details["adapter.id"] == "cli-lora" and details["adapter.version"] == "1"
    assert f"num_examples {len(EVAL_RECORDS)}" in details["metrics.adapter"]
    assert details["loss_curve"].endswith("points (the JSON job has them)")

    # list: a table with the job; status --json: the job.
    rows = table(succeeds("train", "list", "--url", trainer.url))
    assert rows[0] == ["ID", "ADAPTER", "METHOD", "STATUS", "STEP", "LOSS", "CREATED"]
    job_id = next(row[0] for row in rows[1:] if row[1] == "cli-lora")
    job = json.loads(succeeds("train", "status", job_id, "--json", env=env))
    assert job["status"] == "succeeded" and job["progress"]["step"] == STEPS
    listed = json.loads(succeeds("train", "list", "--json", env=env))
    assert job_id in [j["id"] for j in listed]

    # A --config file with a flag overriding it; cancel; status --watch on an ended job exits 1.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**FOREVER, "adapter_id": "from-file"}))
    submitted = json.loads(
        succeeds(
            "train",
            "submit",
            *files,
            "--config",
            str(config),
            "--adapter-id",
            "cli-forever",
            "--json",
            env=env,
        )
    )
    assert (
        submitted["adapter_id"] == "cli-forever" and submitted["config"]["max_steps"] == FOREVER["max_steps"]
    )
    assert succeeds("train", "cancel", submitted["id"], env=env) == f"job {submitted['id']}: cancelled\n"
    watched = adapterd("train", "status", submitted["id"], "--watch", env=env)
    assert watched.returncode == 1 and "cancelled" in watched.stdout

    # Errors: one line and exit status 1; a config without a method is a usage error (exit 2).
    assert "no-such-job" in fails("train", "status", "no-such-job", env=env)
    assert "rank" in fails(
        "train",
        "submit",
        "--data",
        str(data),
        "--adapter-id",
        "x",
        "--method",
        "qlora",
        "--rank",
        "0",
        env=env,
    )
    usage = adapterd("train", "submit", "--data", str(data), "--adapter-id", "x", env=env)
    assert usage.returncode == 2 and "method" in usage.stderr


def test_the_docs_trainer_examples_run(server: serving.Server, trainer: Trainer, tmp_path: Path) -> None:
    """docs/clients.md's trainer examples, in order, with ./train.jsonl the synthetic task's data."""
    blocks = [b for b in python_blocks(DOCS.read_text()) if "TrainerClient" in b]
    assert len(blocks) == 2
    (tmp_path / "train.jsonl").write_bytes(jsonl(TRAIN_RECORDS))
    environment = {"ADAPTERD_URL": server.url, "ADAPTERD_TRAINER_URL": trainer.url}
    lines = run_blocks(blocks, tmp_path, environment, timeout=300).splitlines()
    assert any(line.startswith("succeeded {'base': {") for line in lines) and lines[-2].startswith("base ")
    assert lines[-1].startswith("support-bot ")
