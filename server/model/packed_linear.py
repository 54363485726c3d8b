"""Frozen fp32 linears on the CPU with their weight reordered once for oneDNN (what torch.compile's CPU
freezing pass does, without compiling anything).

The finding behind it (bench/profile.py, 2-vCPU AMD EPYC, one thread): a decode step's `F.linear` calls go to
MKL's sgemm, which at a handful of rows runs at a third of the core's arithmetic rate, not at the memory
bound; the same products through oneDNN with the weight reordered into its blocked layout take 0.35–0.45 of
the time at 1–64 rows, and 0.45 for prefill. The packed weight is an opaque `torch._mkldnn` tensor, so the
module keeps it as a plain attribute (not a parameter) and nothing else reads it.

Measured again with every weight of a decode step distinct (30 layers of the default model, so they stream
from memory as they do when serving, not from the cache): at 1–3 rows MKL's GEMV path through `F.linear`
reads the weights at 15–17 GB/s and oneDNN's packed product at 10–11 GB/s (one stream: 26 against 38 ms per
step's linears); from 4 rows on the packed product is as fast or faster (72 against 83 ms at 32 rows). So the
module keeps the plain weight too (twice the weights' host memory) and picks by the number of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BATCH_HINT = 8  # oneDNN's layout choice barely depends on it (measured 1, 8, 64, 1024: within 5%)
PLAIN_ROWS = 3  # at most this many rows go through F.linear and the plain weight (see above)


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight.detach().contiguous()  # a plain attribute too: never trained, never saved
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, _BATCH_HINT)
        self.bias = None if bias is None else bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= PLAIN_ROWS * self.in_features:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def cpu_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module | None:
    """A `PackedLinear` for this CPU weight, checked against `F.linear` on a random input; None where oneDNN
    is missing, the dtype is not fp32, or the check fails (the caller keeps its plain `nn.Linear`)."""
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or not torch.backends.mkldnn.is_available()
    ):
        return None
    try:
        module = PackedLinear(weight, bias)
        probe = torch.randn(PLAIN_ROWS + 5, weight.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ours, reference = module(probe), F.linear(probe, weight, bias)
    except RuntimeError:
        return None
    scale = reference.abs().max().item() + 1e-30
    return module if (ours - reference).abs().max().item() <= 1e-4 * scale else None
