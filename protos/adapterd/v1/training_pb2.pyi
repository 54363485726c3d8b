from adapterd.v1 import adapters_pb2 as _adapters_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobConfig(_message.Message):
    __slots__ = ("adapter_id", "method", "rank", "alpha", "target_modules", "num_virtual_tokens", "epochs", "max_steps", "learning_rate", "batch_size", "max_seq_len", "seed", "prompt_tuning_init_text", "eval_tasks", "register_if")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    NUM_VIRTUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TUNING_INIT_TEXT_FIELD_NUMBER: _ClassVar[int]
    EVAL_TASKS_FIELD_NUMBER: _ClassVar[int]
    REGISTER_IF_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    method: str
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    num_virtual_tokens: int
    epochs: int
    max_steps: int
    learning_rate: float
    batch_size: int
    max_seq_len: int
    seed: int
    prompt_tuning_init_text: str
    eval_tasks: _containers.RepeatedScalarFieldContainer[str]
    register_if: RegisterIf
    def __init__(self, adapter_id: _Optional[str] = ..., method: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., num_virtual_tokens: _Optional[int] = ..., epochs: _Optional[int] = ..., max_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., seed: _Optional[int] = ..., prompt_tuning_init_text: _Optional[str] = ..., eval_tasks: _Optional[_Iterable[str]] = ..., register_if: _Optional[_Union[RegisterIf, _Mapping]] = ...) -> None: ...

class RegisterIf(_message.Message):
    __slots__ = ("task", "metric", "min_delta")
    TASK_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MIN_DELTA_FIELD_NUMBER: _ClassVar[int]
    task: str
    metric: str
    min_delta: float
    def __init__(self, task: _Optional[str] = ..., metric: _Optional[str] = ..., min_delta: _Optional[float] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("config", "data_chunk", "eval_data_chunk", "tasks_chunk")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DATA_CHUNK_FIELD_NUMBER: _ClassVar[int]
    EVAL_DATA_CHUNK_FIELD_NUMBER: _ClassVar[int]
    TASKS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    config: JobConfig
    data_chunk: bytes
    eval_data_chunk: bytes
    tasks_chunk: bytes
    def __init__(self, config: _Optional[_Union[JobConfig, _Mapping]] = ..., data_chunk: _Optional[bytes] = ..., eval_data_chunk: _Optional[bytes] = ..., tasks_chunk: _Optional[bytes] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("step", "total_steps", "loss", "learning_rate", "tokens_per_second", "eta_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ...) -> None: ...

class EvalScores(_message.Message):
    __slots__ = ("exact_match", "rouge1", "rouge2", "rouge_l", "num_examples")
    EXACT_MATCH_FIELD_NUMBER: _ClassVar[int]
    ROUGE1_FIELD_NUMBER: _ClassVar[int]
    ROUGE2_FIELD_NUMBER: _ClassVar[int]
    ROUGE_L_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    exact_match: float
    rouge1: float
    rouge2: float
    rouge_l: float
    num_examples: int
    def __init__(self, exact_match: _Optional[float] = ..., rouge1: _Optional[float] = ..., rouge2: _Optional[float] = ..., rouge_l: _Optional[float] = ..., num_examples: _Optional[int] = ...) -> None: ...

class JobMetrics(_message.Message):
    __slots__ = ("base", "adapter", "tasks", "gate")
    BASE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    base: EvalScores
    adapter: EvalScores
    tasks: _struct_pb2.Struct
    gate: GateOutcome
    def __init__(self, base: _Optional[_Union[EvalScores, _Mapping]] = ..., adapter: _Optional[_Union[EvalScores, _Mapping]] = ..., tasks: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., gate: _Optional[_Union[GateOutcome, _Mapping]] = ...) -> None: ...

class GateOutcome(_message.Message):
    __slots__ = ("task", "metric", "base", "adapter", "delta", "min_delta", "passed")
    TASK_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    MIN_DELTA_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    task: str
    metric: str
    base: float
    adapter: float
    delta: float
    min_delta: float
    passed: bool
    def __init__(self, task: _Optional[str] = ..., metric: _Optional[str] = ..., base: _Optional[float] = ..., adapter: _Optional[float] = ..., delta: _Optional[float] = ..., min_delta: _Optional[float] = ..., passed: _Optional[bool] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "adapter_id", "method", "status", "progress", "metrics", "error", "created_at", "started_at", "finished_at", "phase", "config", "num_train_examples", "num_eval_examples", "adapter", "loss_curve")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LOSS_CURVE_FIELD_NUMBER: _ClassVar[int]
    id: str
    adapter_id: str
    method: str
    status: str
    progress: JobProgress
    metrics: JobMetrics
    error: str
    created_at: str
    started_at: str
    finished_at: str
    phase: str
    config: JobConfig
    num_train_examples: int
    num_eval_examples: int
    adapter: _adapters_pb2.Adapter
    loss_curve: _containers.RepeatedCompositeFieldContainer[LossPoint]
    def __init__(self, id: _Optional[str] = ..., adapter_id: _Optional[str] = ..., method: _Optional[str] = ..., status: _Optional[str] = ..., progress: _Optional[_Union[JobProgress, _Mapping]] = ..., metrics: _Optional[_Union[JobMetrics, _Mapping]] = ..., error: _Optional[str] = ..., created_at: _Optional[str] = ..., started_at: _Optional[str] = ..., finished_at: _Optional[str] = ..., phase: _Optional[str] = ..., config: _Optional[_Union[JobConfig, _Mapping]] = ..., num_train_examples: _Optional[int] = ..., num_eval_examples: _Optional[int] = ..., adapter: _Optional[_Union[_adapters_pb2.Adapter, _Mapping]] = ..., loss_curve: _Optional[_Iterable[_Union[LossPoint, _Mapping]]] = ...) -> None: ...

class LossPoint(_message.Message):
    __slots__ = ("step", "loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("type", "job")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    type: str
    job: Job
    def __init__(self, type: _Optional[str] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class EvaluateHeader(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("header", "data_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: EvaluateHeader
    data_chunk: bytes
    def __init__(self, header: _Optional[_Union[EvaluateHeader, _Mapping]] = ..., data_chunk: _Optional[bytes] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("adapter_id", "scores")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    scores: EvalScores
    def __init__(self, adapter_id: _Optional[str] = ..., scores: _Optional[_Union[EvalScores, _Mapping]] = ...) -> None: ...
