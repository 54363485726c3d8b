"""The CPU's decode LoRA op as a small C++ kernel (`cpu_lora.cpp`), built on first use by torch's extension
builder (needs a C++ compiler and ninja) and cached per source and CPU in torch's extensions directory.

Why a kernel: on the CPU a decode step's LoRA work is small (a few MB per linear) and its cost is set by
how many torch ops run per linear. `bgmv_embedding_bag` needs about eight (shrink, slice, copy, expand,
add, ...); this kernel does the shrink (once per A stack shared by q/k/v or gate/up), the expand and the
add into the base output in one call, reading each row's slot in place. Measured on the default model,
8 distinct adapters in a batch of 8 (one 2-vCPU AMD EPYC thread): the LoRA share of a decode step's forward
falls from ~11 ms to ~8.5 ms (an A/B of the engine's forward; docs/performance.md). `lora.py` falls back to `bgmv_embedding_bag` when the kernel
cannot be built (a warning says why) or `ADAPTERD_LORA_KERNEL=torch`; tests check both against
`bgmv_reference`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from adapterd.server.model.batch import LoraBatch
    from adapterd.server.model.lora import StackRows

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_lora.cpp")


@functools.cache
def kernel() -> Any | None:
    """The built extension, or None when it cannot be built here."""
    name = f"adapterd_cpu_lora_{_cpu_tag()}"  # -march=native: one build per kind of CPU
    if _is_built(name):
        log.info("CPU LoRA kernel: the cached build")
    else:
        log.info("building the CPU LoRA kernel once for this machine (about 40 s on 2 cores, with g++)")
    try:
        from torch.utils.cpp_extension import load

        return load(
            name,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no ninja, a failed build: the torch ops still work
        log.warning("the CPU LoRA kernel could not be built, decode LoRA runs on embedding_bag: %s", error)
        return None


def _is_built(name: str) -> bool:
    """Whether torch's extension cache already holds this kernel's build (then loading takes a moment)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # a private torch function: if it moves, only the log line is less precise
        return False


def add_lora_(y: torch.Tensor, x: torch.Tensor, rows: StackRows, lora: LoraBatch) -> torch.Tensor:
    """y[i] += x[i] @ A[slot_i][:, :rank] @ B[slot_i][:rank] for decode rows, in place; y: [B, 1, out], x:
    [B, 1, in], both contiguous float32. The shrink of a shared A stack is made once per step and x."""
    built = kernel()
    assert built is not None, "add_lora_ without the kernel"
    shrunk, fresh = lora.per_input(
        ("cpu_lora", rows.a_key), x, lambda: torch.empty(x.shape[0], rows.a_rows.shape[1])
    )
    built.lora_decode_(
        y, x, rows.a_rows, rows.b_rows, lora.slots, shrunk, rows.first, lora.rank, rows.max_rank, fresh
    )
    return y


def _cpu_tag() -> str:
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((line for line in lines if line.startswith("flags")), "")
    return hashlib.sha256(flags.encode()).hexdigest()[:12]
