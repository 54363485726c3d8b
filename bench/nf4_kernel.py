"""One NF4 linear of the Llama-3.1-8B shape, three ways, on a GPU: bitsandbytes' `Linear4bit` forward, the
fused kernel (`triton_nf4.nf4_matmul`) and the bf16 matmul of the dequantized weight (the floor the fused
kernel aims at; ../shared/gpu/README.md measured bitsandbytes at ~3x it from batch 16 on).

Each time is the median of CUDA-event timings after warm-up; the error columns are the largest difference
from the fp64 sums of the same bf16 weight, bitsandbytes' and ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapterd.server.model.loader import Placement, make_base_linear
from adapterd.server.model.triton_nf4 import nf4_matmul

SHAPES = {"gate/up 4096 -> 14336": (14336, 4096), "down 14336 -> 4096": (4096, 14336)}
ROWS = (1, 16, 64, 256)


def time_ms(fn: Callable[[], torch.Tensor], repeats: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def nf4_linears(seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, Any] = {}
    for name, (out_features, in_features) in SHAPES.items():
        results.update(_one_shape(name, out_features, in_features, generator))
        torch.cuda.empty_cache()
    return results


def _one_shape(name: str, out_features: int, in_features: int, generator: torch.Generator) -> dict[str, Any]:
    import bitsandbytes as bnb

    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    module = make_base_linear(weight, None, Placement.resolve("cuda", "nf4", "triton"))
    fused = module.fused
    assert fused is not None, "the 8B shapes are in the layout the fused kernel reads"
    dense = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    bnb_forward = bnb.nn.Linear4bit.forward  # the module's own, without the fused override
    results = {}
    for rows in ROWS:
        x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
        exact = F.linear(x.double(), dense.double())
        theirs, ours = bnb_forward(module, x), nf4_matmul(x, fused)
        results[f"{name}, {rows} rows"] = {
            "shape": name,
            "rows": rows,
            "bitsandbytes_ms": time_ms(lambda: bnb_forward(module, x)),  # noqa: B023
            "fused_ms": time_ms(lambda: nf4_matmul(x, fused)),  # noqa: B023
            "bf16_ms": time_ms(lambda: F.linear(x, dense)),  # noqa: B023
            "bitsandbytes_max_error": (theirs.double() - exact).abs().max().item(),
            "fused_max_error": (ours.double() - exact).abs().max().item(),
        }
    return results


def table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| NF4 linear | rows | bitsandbytes ms | fused ms | bf16 matmul ms | fused / bitsandbytes "
        "| max error bnb | max error fused |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['shape']} | {r['rows']} | {r['bitsandbytes_ms']:.3f} | {r['fused_ms']:.3f} "
            f"| {r['bf16_ms']:.3f} | {r['fused_ms'] / r['bitsandbytes_ms']:.2f} "
            f"| {r['bitsandbytes_max_error']:.2e} | {r['fused_max_error']:.2e} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.nf4_kernel [--out FILE.json]`: print the table (a GPU is needed)."""
    parser = argparse.ArgumentParser(prog="python -m bench.nf4_kernel", description=__doc__)
    parser.add_argument("--out", type=Path, help="also write the results here, as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m bench.nf4_kernel needs a CUDA device")
    results = nf4_linears()
    print("\n".join(table(results)))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
