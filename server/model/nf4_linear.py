"""bitsandbytes' `Linear4bit` whose batched products run the fused NF4 kernel (`triton_nf4`).

The same module to everything that reads it (PEFT wraps it as a `Linear4bit`, `dense.dense_weight` and
DoRA dequantize its weight, the state dict is bitsandbytes'): only `forward` differs. One row (a single
decode stream) stays on bitsandbytes' own matrix-vector kernel, which already runs near the bf16 matmul's
time (../shared/gpu/README.md); from FUSED_MIN_ROWS rows on, the fused kernel replaces bitsandbytes'
dequantize-then-matmul. Chosen with `ADAPTERD_NF4_KERNEL=triton` (`ModelConfig.nf4_kernel`).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from adapterd.server.model.triton_nf4 import NF4Operands, fused_supported, nf4_matmul, nf4_operands

FUSED_MIN_ROWS = 2


class FusedLinear4bit(bnb.nn.Linear4bit):
    """`bnb.nn.Linear4bit` (NF4) with `prepare_fused()` called once its weight is placed and quantized."""

    fused: NF4Operands | None = None

    def prepare_fused(self) -> bool:
        """Gather the kernel's operands from the placed weight; False (bitsandbytes' path kept) for a
        layout the kernel does not read."""
        self.fused = nf4_operands(self.weight) if fused_supported(self.weight) else None
        # bitsandbytes repacks a CPU weight for AVX512-BF16 on its first forward, in place: the fused
        # kernel reads the plain layout, so that repacking stays off (it only happens on the CPU, in tests).
        self.support_avx512bf16_for_cpu = False
        return self.fused is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused
        if fused is None or x.numel() < FUSED_MIN_ROWS * fused.in_features:
            return super().forward(x)
        compute = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        return nf4_matmul(x.to(compute), fused, bias).to(x.dtype)
