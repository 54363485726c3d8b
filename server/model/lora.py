"""Batched LoRA (Hu et al. 2021) applied per row: every row of a batch may use a different adapter.

Adapters live in fixed slots of stacked, zero-padded tensors (one pair per targeted linear layer):
`a[slot] : [in, R]`, `b[slot] : [R, out]`, the LoRA scale folded into b once when the slot is filled.
Zero padding makes every rank fit one shape: the padded columns contribute exact zeros.

Kernel choice for mixed batches (rows with different adapters), read once from the environment at import:
`ADAPTERD_LORA_KERNEL=auto` (the default; `triton` means the same) runs the Triton BGMV/SGMV kernels of
`triton_lora` when x is on CUDA in fp16/bf16/fp32 and Triton is installed, else plain torch ops
(`lora_over_slots` for decode rows over few slots, else `bgmv_reference`); `ADAPTERD_LORA_KERNEL=torch`
always runs the torch ops (the kill switch, should the kernels misbehave on some GPU). `KERNEL` holds the
value ("auto" or "torch"); tests may reassign it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from adapterd.server.model.batch import LoraBatch
from adapterd.server.model.triton_lora import SUPPORTED_DTYPES, bgmv_triton, triton_available

KERNEL = {"": "auto", "auto": "auto", "triton": "auto", "torch": "torch"}.get(
    os.environ.get("ADAPTERD_LORA_KERNEL", "").strip().lower(), ""
)
if not KERNEL:
    raise ValueError(
        f"ADAPTERD_LORA_KERNEL must be auto, triton or torch, not {os.environ['ADAPTERD_LORA_KERNEL']!r}"
    )


def bgmv_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, rank: int
) -> torch.Tensor:
    """Batched gather matrix-vector LoRA delta, in plain torch.

    Semantics: for each row i, delta[i] = x[i] @ a[slots[i], :, :rank] @ b[slots[i], :rank, :] if slots[i] >= 0
    else 0. x: [B, T, in], a: [S, in, R], b: [S, R, out], slots: [B] -> [B, T, out].
    """
    has_adapter = slots >= 0
    index = slots.clamp(min=0)
    shrunk = torch.bmm(x, a[index, :, :rank])  # [B, T, rank]
    delta = torch.bmm(shrunk, b[index, :rank, :])  # [B, T, out]
    return delta * has_adapter.to(delta.dtype)[:, None, None]


def lora_over_slots(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
    """`bgmv_reference` for decode rows (T = 1) without gathering: every row times all slots' A as one
    `[S'*R, in]` matrix (each slot read once, no copies), the other slots' columns zeroed, then times all
    slots' B as one `[S'*R, out]` matrix: two GEMMs. Costs slots/rows times the reference's arithmetic, so
    it is for slots in use not many more than the rows. a, b: the slots in use, [S', in, R], [S', R, out]
    (rank-major storage makes the flattening free; other layouts are copied)."""
    span, in_features, max_rank = a.shape
    a_all = a.transpose(1, 2).reshape(span * max_rank, in_features)
    b_all = b.reshape(span * max_rank, b.shape[2])
    shrunk = x[:, 0] @ a_all.t()  # [B, S'*R]
    return ((shrunk * own_columns(lora, span, max_rank, shrunk.dtype)) @ b_all)[:, None, :]


def own_columns(lora: LoraBatch, span: int, max_rank: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, span*R]: 1 in each row's own slot's R columns, else 0; made once per step and dtype."""
    key = ("own_columns", span, max_rank, dtype)
    if key not in lora.cache:
        own = lora.slots[:, None] == torch.arange(span, device=lora.slots.device)[None, :]  # [B, span]
        lora.cache[key] = own.to(dtype).repeat_interleave(max_rank, dim=1)
    return lora.cache[key]


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
    """The batch's LoRA delta: two plain matmuls when every row uses one adapter; else the Triton kernels
    on CUDA; else, for decode rows over few slots, `lora_over_slots`; else `bgmv_reference`."""
    if lora.shared_slot is not None:
        return (x @ a[lora.shared_slot, :, : lora.rank]) @ b[lora.shared_slot, : lora.rank, :]
    if KERNEL == "auto" and x.is_cuda and x.dtype in SUPPORTED_DTYPES and triton_available():
        return bgmv_triton(x, a, b, lora.slots, lora.rank)
    span = lora.slot_span or a.shape[0]
    if x.shape[1] == 1 and span <= 2 * x.shape[0]:
        return lora_over_slots(x, a[:span], b[:span], lora)
    return bgmv_reference(x, a, b, lora.slots, lora.rank)


class LoRALinear(nn.Module):
    """A base linear layer (plain or quantized, never modified) plus per-row LoRA from adapter slots."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        # Views of the engine's slot stacks (engine/adapter_slots.py), set when the engine starts.
        self.lora_a: torch.Tensor | None = None  # [S, in, R]
        self.lora_b: torch.Tensor | None = None  # [S, R, out]

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        y = self.base(x)
        if lora is None or lora.rank == 0 or self.lora_a is None or self.lora_b is None:
            return y
        return y + lora_delta(x.to(self.lora_a.dtype), self.lora_a, self.lora_b, lora).to(y.dtype)
