"""Batched LoRA (Hu et al. 2021) applied per row: every row of a batch may use a different adapter.

Adapters live in fixed slots of stacked, zero-padded tensors (one pair per targeted linear layer):
`a[slot] : [in, R]`, `b[slot] : [R, out]`, the LoRA scale folded into b once when the slot is filled.
Zero padding makes every rank fit one shape: the padded columns contribute exact zeros.

Kernels, chosen once per model when the engine places its slot stacks (`choose_kernels`, from
`EngineConfig.lora_kernel`): "auto" (the default) runs CPU decode rows in fp32 (one adapter or many) through
the C++ kernel of `cpu_lora` when it builds, and mixed batches on CUDA in fp16/bf16/fp32 through the Triton
BGMV/SGMV kernels of `triton_lora` when Triton is installed; everything else runs plain torch ops
(`bgmv_embedding_bag` for decode rows on the CPU, else `bgmv_reference`). "torch" always runs the torch ops
(the kill switch, should a kernel misbehave on some machine: `ADAPTERD_LORA_KERNEL=torch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapterd.server.model import cpu_lora
from adapterd.server.model.batch import LoraBatch
from adapterd.server.model.triton_lora import SUPPORTED_DTYPES, bgmv_triton, triton_available


@dataclass(frozen=True)
class LoraKernels:
    """Which kernels a model's LoRA linears use, decided once (the rows' shape still picks per call)."""

    cpu_decode: bool  # CPU fp32 decode rows through cpu_lora's C++ kernel
    triton: bool  # CUDA mixed batches through triton_lora


TORCH_OPS = LoraKernels(cpu_decode=False, triton=False)


def choose_kernels(setting: str, device: torch.device, dtype: torch.dtype) -> LoraKernels:
    """The kernels for a model on `device` in `dtype`: `setting` "auto" takes whatever works here (building
    the CPU kernel now, not in the first request's step), "torch" the plain torch ops."""
    if setting == "torch":
        return TORCH_OPS
    if device.type == "cuda":
        return LoraKernels(cpu_decode=False, triton=dtype in SUPPORTED_DTYPES and triton_available())
    return LoraKernels(cpu_decode=dtype == torch.float32 and cpu_lora.kernel() is not None, triton=False)


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
    # where, not a product with 0: a row without adapter reads slot 0, and 0 * inf is NaN in its output.
    return torch.where(has_adapter[:, None, None], delta, 0)


@dataclass(frozen=True)
class StackRows:
    """One linear's slot stacks as flat tables for the CPU ops (views, no copies): `a_rows` [S*in, n*R] is the A
    stack it shares with the linears reading the same input (q/k/v, gate/up; n = 1 when none), its own A
    being columns `first:first+R`; `b_rows` [S*R, out] is its B."""

    a_rows: torch.Tensor
    first: int
    b_rows: torch.Tensor
    max_rank: int  # R
    a_key: tuple[str, int]  # names the A stack in a step's cache (the linears sharing it share its shrink)

    @classmethod
    def of(
        cls, a: torch.Tensor, b: torch.Tensor, a_stack: torch.Tensor | None, first: int
    ) -> StackRows | None:
        """The tables of a linear whose A `a` [S, in, R] is columns `first:` of `a_stack` [S, in, n*R] (None:
        `a` itself); None unless the stacks are contiguous."""
        stack = a if a_stack is None else a_stack
        if not (stack.is_contiguous() and b.is_contiguous()):
            return None
        a_rows = stack.view(-1, stack.shape[2])
        return cls(a_rows, first, b.view(-1, b.shape[2]), b.shape[1], ("a_stack", a_rows.data_ptr()))


def bgmv_embedding_bag(x: torch.Tensor, rows: StackRows, lora: LoraBatch) -> torch.Tensor:
    """`bgmv_reference` for decode rows (T = 1) on the CPU, reading each row's own slot in place, no copies:
    the shrink `x[i] @ A[slot_i]` is the sum of A[slot_i]'s `in` rows weighted by x[i], the expand the sum
    of B[slot_i]'s first `rank` rows weighted by the shrink: both are `embedding_bag` with per-sample
    weights (one bag per row; rows without adapter get an empty bag, so a zero delta). It reads exactly the
    rows' adapter bytes, where a gather copies them and GEMMs over all slots multiply by every slot (see
    bench/profile.py). The linears that share an A stack shrink once, in one call, for the same x in a step.
    x: [B, 1, in] -> [B, 1, out]."""
    plan = lora.cache.get("bags")
    if plan is None:
        plan = lora.cache["bags"] = _BagPlan(lora.slots)
    shrunk, _ = lora.per_input(("embedding_bag", rows.a_key), x, lambda: plan.shrink(x, rows.a_rows))
    shrunk = shrunk[:, rows.first : rows.first + lora.rank]  # [rows with adapter, rank]
    indices, offsets = plan.bags(rows.max_rank, lora.rank)
    # torch.embedding_bag, not F.embedding_bag: the same op without the wrapper's per-call argument checks.
    delta = torch.embedding_bag(rows.b_rows, indices, offsets, False, 0, False, shrunk.reshape(-1))[0]
    return delta.unsqueeze(1)


class _BagPlan:
    """What `bgmv_embedding_bag` derives from a step's slots, once per step: which rows have an adapter and
    `embedding_bag`'s indices and offsets per table shape."""

    def __init__(self, slots: torch.Tensor) -> None:
        self.slots = slots
        self.has = (slots >= 0).long()
        self.with_adapter = None if bool(self.has.all()) else self.has.nonzero()[:, 0]  # None: every row
        self._bags: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def bags(self, width: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, offsets) taking rows `slot * width + [0, count)` of a table for each row that has an
        adapter, and an empty bag for each row that has none."""
        key = (width, count)
        if key not in self._bags:
            indices = self.slots[self.has.bool()][:, None] * width + torch.arange(count)[None, :]
            self._bags[key] = indices.reshape(-1), (torch.cumsum(self.has, 0) - self.has) * count
        return self._bags[key]

    def shrink(self, x: torch.Tensor, a_rows: torch.Tensor) -> torch.Tensor:
        """x[i] @ A[slot_i] over the whole stack's columns, for the rows that have an adapter."""
        in_features = x.shape[-1]
        weights = x.reshape(-1) if self.with_adapter is None else x[:, 0].index_select(0, self.with_adapter)
        indices, offsets = self.bags(in_features, in_features)
        shrunk = torch.embedding_bag(a_rows, indices, offsets, False, 0, False, weights.reshape(-1))[0]
        return shrunk if self.with_adapter is None else shrunk.index_select(0, self.with_adapter)


def lora_delta(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    lora: LoraBatch,
    rows: StackRows | None = None,
    kernels: LoraKernels | None = None,
) -> torch.Tensor:
    """The batch's LoRA delta: two plain matmuls when every row uses one adapter; else the Triton kernels
    on CUDA (when `kernels` has them; None: whatever works for x); else, for decode rows on the CPU with the
    stacks as tables (`rows`), `bgmv_embedding_bag`; else `bgmv_reference`."""
    if lora.shared_slot is not None:
        return (x @ a[lora.shared_slot, :, : lora.rank]) @ b[lora.shared_slot, : lora.rank, :]
    if x.is_cuda:
        if (kernels or choose_kernels("auto", x.device, x.dtype)).triton:
            return bgmv_triton(x, a, b, lora.slots, lora.rank)
    elif rows is not None and x.shape[1] == 1:
        return bgmv_embedding_bag(x, rows, lora)
    return bgmv_reference(x, a, b, lora.slots, lora.rank)


def add_lora_(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    lora: LoraBatch,
    rows: StackRows | None,
    kernels: LoraKernels,
) -> torch.Tensor:
    """y += the batch's LoRA delta, in place. Decode rows on the CPU in fp32 (one adapter or many) take the
    C++ kernel of `cpu_lora` (one call per linear) when `kernels` has it; everything else adds `lora_delta`."""
    if (
        kernels.cpu_decode
        and rows is not None
        and x.shape[1] == 1
        and x.dtype == y.dtype == torch.float32
        and x.is_contiguous()
        and y.is_contiguous()
    ):
        return cpu_lora.add_lora_(y, x, rows, lora)
    return y.add_(lora_delta(x, a, b, lora, rows, kernels))


class LoRALinear(nn.Module):
    """A base linear layer (plain or quantized, never modified) plus per-row LoRA from adapter slots."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        # Views of the engine's slot stacks (engine/adapter_slots.py), set by `use_slots` when the engine starts.
        self.lora_a: torch.Tensor | None = None  # [S, in, R]
        self.lora_b: torch.Tensor | None = None  # [S, R, out]
        self.lora_rows: StackRows | None = None
        self.kernels = TORCH_OPS
        # Per-row scale stacks (DoRA, IA³) [S + 1, in] and [S + 1, out], set by `use_scales`.
        self.key: tuple[int, str] | None = None
        self.in_scales: torch.Tensor | None = None
        self.out_scales: torch.Tensor | None = None

    def use_slots(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        a_stack: torch.Tensor | None = None,
        first: int = 0,
        kernels: LoraKernels | None = None,
    ) -> None:
        """Read adapters from the slot stacks a [S, in, R] and b [S, R, out]; `a` may be columns `first:` of
        an A stack [S, in, n*R] shared with linears that read the same input. `kernels` (None: whatever
        works for the stacks' device and dtype) is how the LoRA runs."""
        self.lora_a, self.lora_b = a, b
        self.lora_rows = StackRows.of(a, b, a_stack, first)
        self.kernels = kernels if kernels is not None else choose_kernels("auto", a.device, a.dtype)

    def use_scales(self, key: tuple[int, str], in_scales: torch.Tensor, out_scales: torch.Tensor) -> None:
        """Read per-row scale vectors from the stacks in_scales [S + 1, in] and out_scales [S + 1, out]; `key`
        is this linear's (layer, module), as a step's `LoraBatch` names the linears it scales."""
        self.key, self.in_scales, self.out_scales = key, in_scales, out_scales

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        """Per row: (base(x * s_in) + (x * s_in) @ A @ B) * s_out, each part only where some row has it."""
        if lora is None:
            return self.base(x)
        key = self.key
        if self.in_scales is not None and key is not None and lora.scales(key, outputs=False):
            x = x * _row_scales(self.in_scales, lora).to(x.dtype)
        y = self.base(x)
        if lora.rank > 0 and self.lora_a is not None and self.lora_b is not None:
            lora_x = x if x.dtype == self.lora_a.dtype else x.to(self.lora_a.dtype)
            y = add_lora_(y, lora_x, self.lora_a, self.lora_b, lora, self.lora_rows, self.kernels)
        if self.out_scales is not None and key is not None and lora.scales(key, outputs=True):
            y = y.mul_(_row_scales(self.out_scales, lora).to(y.dtype))
        return y


def _row_scales(stack: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
    """Each row's scale vector from `stack` [S + 1, features]: [B, 1, features]."""
    assert lora.scale_slots is not None
    return stack.index_select(0, lora.scale_slots)[:, None, :]
