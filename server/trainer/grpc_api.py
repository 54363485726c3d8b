"""The `adapterd.v1.Training` servicer and the trainer's gRPC server (with health checking and reflection)."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from adapterd.server.common.auth import ApiKeys, Principal
from adapterd.server.common.errors import AdapterNotFound, InvalidRequest, PayloadTooLarge
from adapterd.server.trainer.config import JobConfig
from adapterd.server.trainer.evaluate import evaluate_file
from adapterd.server.trainer.http_api import MAX_DATA_BYTES
from adapterd.server.trainer.jobs import Job
from adapterd.server.trainer.service import TrainerService
from adapterd.server.wire.grpc_server import GrpcServer, start_server
from adapterd.server.wire.rpc import rpc
from adapterd.v1 import adapters_pb2, training_pb2_grpc
from adapterd.v1 import training_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Training"].full_name
OPTIONAL_FIELDS = (
    "rank",
    "alpha",
    "num_virtual_tokens",
    "epochs",
    "max_steps",
    "learning_rate",
    "batch_size",
    "max_seq_len",
    "seed",
    "prompt_tuning_init_text",
)


def config_dict(message: pb.JobConfig) -> dict[str, Any]:
    """The proto config as the HTTP API's JSON: unset fields absent, so they take the defaults."""
    values: dict[str, Any] = {"adapter_id": message.adapter_id, "method": message.method}
    values.update({name: getattr(message, name) for name in OPTIONAL_FIELDS if message.HasField(name)})
    if message.target_modules:
        values["target_modules"] = list(message.target_modules)
    if message.eval_tasks:
        values["eval_tasks"] = list(message.eval_tasks)
    if message.HasField("register_if"):
        values["register_if"] = json_format.MessageToDict(
            message.register_if, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    return values


def job_message(job: dict[str, Any]) -> pb.Job:
    """A job dict (`Job.to_dict()`) as the proto message: every field of the HTTP job; metrics only once
    evaluated, the example counts once the data is loaded, the adapter once uploaded."""
    message = pb.Job(
        id=job["id"],
        adapter_id=job["adapter_id"],
        method=job["method"],
        status=job["status"],
        phase=job["phase"],
        config=json_format.ParseDict(
            {k: v for k, v in job["config"].items() if v is not None}, pb.JobConfig()
        ),
        progress=pb.JobProgress(**job["progress"]),
        error=job["error"] or "",
        created_at=job["created_at"],
        started_at=job["started_at"] or "",
        finished_at=job["finished_at"] or "",
        loss_curve=[pb.LossPoint(step=int(step), loss=loss) for step, loss in job["loss_curve"]],
    )
    for name in ("num_train_examples", "num_eval_examples"):
        if job[name] is not None:
            setattr(message, name, job[name])
    metrics = job["metrics"] or {}
    for name in ("base", "adapter"):
        if name in metrics:
            getattr(message.metrics, name).CopyFrom(scores_message(metrics[name]))
    if "tasks" in metrics:
        message.metrics.tasks.update(metrics["tasks"])
    if "gate" in metrics:
        message.metrics.gate.CopyFrom(pb.GateOutcome(**metrics["gate"]))
    if job["adapter"]:
        message.adapter.CopyFrom(
            json_format.ParseDict(job["adapter"], adapters_pb2.Adapter(), ignore_unknown_fields=True)
        )
    return message


def scores_message(scores: dict[str, Any]) -> pb.EvalScores:
    """`Scores.to_dict()` (the HTTP API's scores) as the proto message."""
    return pb.EvalScores(
        exact_match=scores["exact_match"],
        rouge1=scores["rouge1"],
        rouge2=scores["rouge2"],
        rouge_l=scores["rougeL"],
        num_examples=scores["num_examples"],
    )


FILE_PARTS = ("data_chunk", "eval_data_chunk", "tasks_chunk")  # in this order, each optional but data


async def receive_files(
    parts: AsyncIterator[pb.SubmitJobRequest], tmp: Path
) -> tuple[Path, Path | None, Path | None]:
    """Write the data, eval data and tasks chunks to files (data, eval_data, tasks: the non-empty ones);
    refuse anything out of order, or past the HTTP API's per-file limit."""
    paths = [tmp / kind.removesuffix("_chunk") for kind in FILE_PARTS]
    sizes = [0, 0, 0]
    files = [path.open("wb") for path in paths]
    try:
        current = 0
        async for part in parts:
            kind = part.WhichOneof("part")
            index = FILE_PARTS.index(kind) if kind in FILE_PARTS else -1
            if index < current:
                raise InvalidRequest(
                    "send the config first and only once, then data chunks, then eval_data chunks, "
                    "then tasks chunks"
                )
            current = index
            chunk = getattr(part, kind)
            sizes[index] += len(chunk)
            if sizes[index] > MAX_DATA_BYTES:
                raise PayloadTooLarge(f"{paths[index].name} exceeds the {MAX_DATA_BYTES}-byte limit")
            files[index].write(chunk)
    finally:
        for file in files:
            file.close()
    if sizes[0] == 0:
        raise InvalidRequest("no training data: send data_chunk messages after the config")
    return paths[0], paths[1] if sizes[1] else None, paths[2] if sizes[2] else None


async def receive_eval_data(parts: AsyncIterator[pb.EvaluateRequest], path: Path) -> None:
    """Write Evaluate's data chunks to `path`, refused past the HTTP API's per-file limit."""
    size = 0
    with path.open("wb") as data:
        async for part in parts:
            if part.WhichOneof("part") != "data_chunk":
                raise InvalidRequest("send the header first and only once, then data chunks")
            size += len(part.data_chunk)
            if size > MAX_DATA_BYTES:
                raise PayloadTooLarge(f"data exceeds the {MAX_DATA_BYTES}-byte limit")
            data.write(part.data_chunk)
    if size == 0:
        raise InvalidRequest("no evaluation data: send data_chunk messages after the header")


class TrainingServicer(training_pb2_grpc.TrainingServicer):
    def __init__(self, service: TrainerService, keys: ApiKeys) -> None:
        self.service = service
        self.keys = keys

    @rpc
    async def SubmitJob(self, requests: AsyncIterator[pb.SubmitJobRequest], principal: Principal) -> pb.Job:
        parts = aiter(requests)
        first = await anext(parts, None)
        if first is None or first.WhichOneof("part") != "config":
            raise InvalidRequest("the first message of SubmitJob must be the config")
        config = JobConfig.from_dict(config_dict(first.config))
        principal.require_owner(config.adapter_id)  # before receiving any data
        with tempfile.TemporaryDirectory(dir=self.service.store.tmp) as tmp:
            data, eval_data, tasks = await receive_files(parts, Path(tmp))
            job = await self.service.submit(config, data, eval_data, principal, tasks)
        return job_message(job.to_dict())

    @rpc
    async def GetJob(self, request: pb.GetJobRequest, principal: Principal) -> pb.Job:
        return job_message(self.service.get(request.id, principal).to_dict())

    @rpc
    async def ListJobs(self, request: pb.ListJobsRequest, principal: Principal) -> pb.ListJobsResponse:
        jobs: list[Job] = self.service.list_jobs(principal)
        return pb.ListJobsResponse(jobs=[job_message(job.to_dict()) for job in jobs])

    @rpc
    async def WatchJob(self, request: pb.WatchJobRequest, principal: Principal) -> AsyncIterator[pb.JobEvent]:
        async for kind, job in self.service.watch(request.id, principal):
            yield pb.JobEvent(type=kind, job=job_message(job))

    @rpc
    async def CancelJob(self, request: pb.CancelJobRequest, principal: Principal) -> pb.Job:
        return job_message((await self.service.cancel(request.id, principal)).to_dict())

    @rpc
    async def Evaluate(
        self, requests: AsyncIterator[pb.EvaluateRequest], principal: Principal
    ) -> pb.Evaluation:
        parts = aiter(requests)
        first = await anext(parts, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidRequest("the first message of Evaluate must be the header (the adapter id)")
        adapter_id = first.header.adapter_id or None
        if adapter_id and not principal.can_see(adapter_id):  # before receiving any data
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        with tempfile.TemporaryDirectory(dir=self.service.store.tmp) as tmp:
            data = Path(tmp) / "data"
            await receive_eval_data(parts, data)
            scores = await evaluate_file(self.service.server, data, adapter_id)
        return pb.Evaluation(adapter_id=adapter_id or "", scores=scores_message(scores.to_dict()))


async def start_grpc_server(service: TrainerService, keys: ApiKeys, address: str) -> GrpcServer:
    """Serve Training, health and reflection on `address` ("host:port")."""

    def add_servicers(server: grpc.aio.Server) -> None:
        training_pb2_grpc.add_TrainingServicer_to_server(TrainingServicer(service, keys), server)

    return await start_server(address, add_servicers, (SERVICE_NAME,))
