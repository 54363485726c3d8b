"""Configuration: frozen dataclasses, and the only place that reads the environment."""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Quantize = Literal["auto", "nf4", "int8", "none"]
Device = Literal["auto", "cuda", "cpu"]


LORA_KERNELS = {"auto": "auto", "triton": "auto", "torch": "torch"}  # ADAPTERD_LORA_KERNEL -> setting


def lora_kernel_from_env() -> str:
    """$ADAPTERD_LORA_KERNEL: auto (the default; triton means the same) or torch (plain torch ops only)."""
    value = os.environ.get("ADAPTERD_LORA_KERNEL", "").strip().lower() or "auto"
    if value not in LORA_KERNELS:
        raise ValueError(f"ADAPTERD_LORA_KERNEL must be auto, triton or torch, not {value!r}")
    return LORA_KERNELS[value]


NF4_KERNELS = ("bitsandbytes", "triton")


def nf4_kernel_from_env() -> str:
    """$ADAPTERD_NF4_KERNEL: bitsandbytes (the default) or triton (server/model/triton_nf4.py: NF4 linears of
    two rows or more through the fused dequantize-and-multiply kernel; CUDA only)."""
    value = os.environ.get("ADAPTERD_NF4_KERNEL", "").strip().lower() or "bitsandbytes"
    if value not in NF4_KERNELS:
        raise ValueError(f"ADAPTERD_NF4_KERNEL must be bitsandbytes or triton, not {value!r}")
    return value


def default_cache_dir() -> Path:
    """Where converted models are cached: $ADAPTERD_CACHE, else ~/.cache/adapterd."""
    env = os.environ.get("ADAPTERD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "adapterd"


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load, and how."""

    model: str = "default"
    quantize: Quantize = "auto"
    device: Device = "auto"
    cache_dir: Path | None = None
    nf4_kernel: str = field(default_factory=nf4_kernel_from_env)  # "bitsandbytes" or "triton"

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or default_cache_dir()


# Prompt tokens a step computes next to the decode rows. Chosen so that such a mixed step costs at most
# about 3x a decode step, as measured with bench.http_serving's `long` case (docs/performance.md): on a
# CPU prefill is compute-bound and a 256-token chunk costs ~12x a decode step; on a GPU it is nearly free.
PREFILL_CHUNK_TOKENS = {"cpu": 64, "cuda": 256}

# Structured output: the most bytes a constraint's text (schema, regex, grammar, choices) may have, and how
# many compiled grammars are kept (by their text) for the requests that repeat them.
MAX_GRAMMAR_BYTES = 64 * 1024
GRAMMAR_CACHE_SIZE = 256

# JSON request bodies: the most bytes one may have (413 beyond), the deepest nesting and the longest integer
# (digits) it may hold (400 beyond). Far above what any client sends; they bound the parser's memory, its
# recursion and the time Python takes to read a long integer.
MAX_JSON_BODY_BYTES = 16 * 1024**2
MAX_JSON_DEPTH = 64
MAX_JSON_INTEGER_DIGITS = 64

# Liveness: the engine is unhealthy after this many engine steps in a row failed (a step that fails every
# time, a lost device), or when its thread died; health checks answer 503 / NOT_SERVING from then on.
MAX_FAILED_STEPS_IN_A_ROW = 3
HEALTH_WATCH_SECONDS = 1.0  # how often `adapterd serve` looks, for gRPC health and --exit-when-unhealthy


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the engine: batch, KV cache and adapter slots."""

    max_batch: int = 32
    max_rank: int = 64
    max_gpu_adapters: int = 16
    max_soft_prompts: int = 16
    max_virtual_tokens: int = 128
    kv_block_size: int = 16
    kv_cache_tokens: int = 16384
    max_seq_len: int = 4096
    max_prefill_tokens: int = 4096  # new tokens one prefill step computes
    # ... while other sequences are decoding (chunked prefill); 0: the device's PREFILL_CHUNK_TOKENS
    prefill_chunk_tokens: int = 0
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs on a GPU (`--enforce-eager`: off)
    prefix_caching: bool = True  # reuse computed KV blocks of the same model and leading tokens
    lora_kernel: str = field(default_factory=lora_kernel_from_env)  # "auto" kernels, or "torch" ops only
    cpu_threads: int = 0  # torch threads of the engine on a CPU; 0: torch's own choice (every core)

    def __post_init__(self) -> None:
        assert self.max_batch >= 1 and self.max_rank >= 1
        assert self.kv_block_size >= 1 and self.kv_cache_tokens >= self.kv_block_size
        assert self.max_gpu_adapters >= 1 and self.max_soft_prompts >= 1
        assert self.prefill_chunk_tokens >= 0 and self.max_prefill_tokens >= 1
        assert self.cpu_threads >= 0

    def for_device(self, device_type: str) -> EngineConfig:
        """This config with the device's defaults filled in where it leaves them to the device."""
        if self.prefill_chunk_tokens:
            return self
        chunk = PREFILL_CHUNK_TOKENS.get(device_type, PREFILL_CHUNK_TOKENS["cuda"])
        return dataclasses.replace(self, prefill_chunk_tokens=chunk)

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache_tokens // self.kv_block_size


FRONT_END_CORES = 1  # cores `adapterd serve` leaves to its HTTP/gRPC front end and local clients


def serving_cpu_threads() -> int:
    """The engine's CPU threads under `adapterd serve`: every core this process may use but
    FRONT_END_CORES, at least one. A torch thread that shares its core with the event loop or a client
    stalls every parallel op of the step at its barrier (see docs/performance.md)."""
    return max(1, len(os.sched_getaffinity(0)) - FRONT_END_CORES)


REPLICA_HEADER = "x-adapterd-replica"  # the HTTP header and gRPC metadata key that names the replica


@dataclass(frozen=True)
class ServerConfig:
    """The network side: ports, the adapter store, limits and keys."""

    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 50051
    store: Path | None = None  # None: <cache dir>/store
    max_cpu_adapters: int = 64
    max_pending_requests: int = 256  # beyond this, 429 / RESOURCE_EXHAUSTED
    max_upload_bytes: int = 2 * 1024**3
    api_keys: Path | None = None
    allowed_lora_dirs: tuple[Path, ...] = ()  # where POST /v1/load_lora_adapter may read from
    exit_when_unhealthy: bool = False  # exit (status 3) once the engine is unhealthy, for a supervisor
    replica_name: str = ""  # names this server in the X-Adapterd-Replica header and /metrics
    metrics_tenant_adapters: bool = False  # name tenant adapters in the gateway's series of /metrics
    trainer_url: str | None = None  # the trainer whose routes this server forwards (the console's Training)
    access_log: bool = True  # one log line per HTTP request (adapterd.access)

    def store_dir(self, cache_dir: Path) -> Path:
        return self.store or cache_dir / "store"

    @property
    def replica(self) -> str:
        """This server's name among replicas: --replica-name, else host name and HTTP port (a Kubernetes
        pod's host name is the pod's name)."""
        return self.replica_name or f"{socket.gethostname()}:{self.http_port}"
