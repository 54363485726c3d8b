"""A fused dequantize-and-multiply kernel for bitsandbytes' NF4 weights, in Triton.

Why: at batch >= 16 bitsandbytes runs an NF4 linear as `dequantize_4bit` (the whole weight written out in
bf16) followed by a bf16 matmul, ~3x the time of the bf16 matmul alone on an H200 (../shared/gpu/README.md).
This kernel reads the 4-bit bytes and their block constants tile by tile and multiplies them in registers,
so the weight crosses memory once, at half a byte per element.

`nf4_matmul(x, weight, bias)` computes what bitsandbytes' batched path computes, from the same bytes:
`F.linear(x, dequantize_4bit(weight.data, weight.quant_state).to(x.dtype), bias)`. Each weight element is
`code[nibble] * absmax[block]` in fp32 (absmax itself `code2[absmax_q] * absmax2[block // 256] + offset`
under double quantization, QLoRA's), rounded to the weight's dtype as `dequantize_4bit` rounds it, then to
x's dtype; products accumulate in fp32 (`tl.dot`, fp32 inputs with `input_precision="ieee"`). So it equals
that reference up to the order of the fp32 sums (tests/unit/test_triton_nf4.py checks it, in Triton's
interpreter on the CPU and compiled on a GPU).

The layout it reads (bitsandbytes 0.46-0.50, `Params4bit` with `quant_type="nf4"`): the [out, in] weight
flattened row-major, two elements a byte, the even element in the high nibble; one absmax per 64
consecutive elements (`blocksize`). With `in % 64 == 0` (every real model's widths) a 64-wide `k` tile of one
output row is one block, so the kernel loads one absmax per column of its tile, the tile's bytes as
[32, BLOCK_N], and multiplies the even and the odd `k` columns of x by the high and the low nibbles.
`fused_supported` says which weights qualify; the others stay on bitsandbytes' own path.

Triton is imported lazily, as in `triton_lora` (whose interpreter notes apply here too).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from adapterd.server.model.triton_lora import _cdiv, _pow2, interpreted  # one answer for the process

tl: Any = None  # bound by `_kernel()`, read by the kernel body when Triton compiles or interprets it

NF4_BLOCK = 64  # the `blocksize` the kernel is written for (bitsandbytes' default for 4-bit weights)
_HALF = NF4_BLOCK // 2  # bytes of one block
_MIN_DOT = 16
_MAX_BLOCK_M = 64
_BLOCK_N = 64
_ROUNDING = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the weight dtype dequantize rounds to


def _nf4_matmul(
    x_ptr,
    w_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    code_ptr,
    bias_ptr,
    out_ptr,
    rows,
    out_features,
    offset,
    stride_xm,
    stride_om,
    K_BLOCKS: tl.constexpr,
    BLOCK2: tl.constexpr,
    NESTED: tl.constexpr,
    ROUNDING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HALF: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * W[n, k] for one [BLOCK_M, BLOCK_N] tile; grid (rows / BLOCK_M, out / BLOCK_N)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    m_mask = offs_m < rows
    n_mask = offs_n < out_features
    in_features = K_BLOCKS * 2 * HALF
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * (in_features // 2)  # byte 0 of each output row
    block_cols = offs_n.to(tl.int64) * K_BLOCKS  # the absmax block of each output row's first k tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K_BLOCKS):
        packed = tl.load(w_cols + kb * HALF + offs_h[:, None], mask=n_mask[None, :], other=0)  # [HALF, N]
        high = tl.load(code_ptr + (packed >> 4).to(tl.int32))
        low = tl.load(code_ptr + (packed & 15).to(tl.int32))
        block = block_cols + kb
        if NESTED:
            absmax_q = tl.load(absmax_ptr + block, mask=n_mask, other=0).to(tl.int32)
            scale = tl.load(absmax2_ptr + block // BLOCK2, mask=n_mask, other=0.0)
            absmax = tl.load(code2_ptr + absmax_q) * scale + offset
        else:
            absmax = tl.load(absmax_ptr + block, mask=n_mask, other=0.0)
        w_even = high * absmax[None, :]
        w_odd = low * absmax[None, :]
        if ROUNDING == 1:
            w_even, w_odd = w_even.to(tl.float16), w_odd.to(tl.float16)
        elif ROUNDING == 2:  # to nearest even by hand: the interpreter's cast to bfloat16 truncates
            even_bits = w_even.to(tl.uint32, bitcast=True)
            odd_bits = w_odd.to(tl.uint32, bitcast=True)
            even_bits = ((even_bits + 0x7FFF + ((even_bits >> 16) & 1)) >> 16) << 16
            odd_bits = ((odd_bits + 0x7FFF + ((odd_bits >> 16) & 1)) >> 16) << 16
            w_even = even_bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
            w_odd = odd_bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
        k_even = kb * 2 * HALF + 2 * offs_h
        x_even = tl.load(x_rows + k_even[None, :], mask=m_mask[:, None], other=0.0)  # [M, HALF]
        x_odd = tl.load(x_rows + (k_even + 1)[None, :], mask=m_mask[:, None], other=0.0)
        w_even, w_odd = w_even.to(x_even.dtype), w_odd.to(x_even.dtype)
        if IEEE:
            acc += tl.dot(x_even, w_even, input_precision="ieee")
            acc += tl.dot(x_odd, w_odd, input_precision="ieee")
        else:
            acc += tl.dot(x_even, w_even)
            acc += tl.dot(x_odd, w_odd)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.cache
def _kernel() -> Any:
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_nf4_matmul)


def fused_supported(weight: Any) -> bool:
    """Whether `weight` (a bitsandbytes `Params4bit`) is in the layout `nf4_matmul` reads."""
    state = getattr(weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or state.blocksize != NF4_BLOCK:
        return False
    if getattr(state, "packing_format_for_cpu", False) or state.dtype not in _ROUNDING:
        return False
    out_features, in_features = state.shape
    return in_features % NF4_BLOCK == 0 and weight.data.numel() * 2 == out_features * in_features


@dataclass(frozen=True)
class NF4Operands:
    """What the kernel reads of one NF4 weight, gathered once where the weight is placed (reading the
    double-quantization offset is a device sync, which a CUDA graph capture cannot contain)."""

    packed: torch.Tensor  # uint8, two elements a byte
    absmax: torch.Tensor  # uint8 codes (nested) or fp32, one per 64 elements
    absmax2: torch.Tensor  # fp32 scales of the codes, one per `block2` absmax (nested; else absmax again)
    code2: torch.Tensor  # fp32 [256] (nested; else code again)
    code: torch.Tensor  # fp32 [16]: the NF4 values
    offset: float
    block2: int
    nested: bool
    rounding: int  # _ROUNDING of the weight's dtype
    out_features: int
    in_features: int


def nf4_operands(weight: Any) -> NF4Operands:
    """The operands of a `fused_supported` NF4 weight, on its device."""
    assert fused_supported(weight), "nf4_operands: a weight fused_supported() refuses"
    state = weight.quant_state
    nested = bool(state.nested)
    out_features, in_features = state.shape
    return NF4Operands(
        packed=weight.data,
        absmax=state.absmax,
        absmax2=state.state2.absmax if nested else state.absmax,
        code2=state.state2.code if nested else state.code,
        code=state.code,
        offset=float(state.offset) if nested else 0.0,
        block2=state.state2.blocksize if nested else 1,
        nested=nested,
        rounding=_ROUNDING[state.dtype],
        out_features=out_features,
        in_features=in_features,
    )


def nf4_matmul(x: torch.Tensor, weight: NF4Operands, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] (fp16, bf16 or fp32) @ the NF4 weight [out, in] (+ bias) -> [..., out] in x's dtype."""
    assert x.shape[-1] == weight.in_features and x.dtype in _ROUNDING
    if not x.is_cuda and not interpreted():
        raise RuntimeError("nf4_matmul runs CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")
    flat = x.reshape(-1, weight.in_features)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    out = torch.empty(rows, weight.out_features, dtype=x.dtype, device=x.device)
    block_m = min(_MAX_BLOCK_M, max(_MIN_DOT, _pow2(rows)))
    grid = (_cdiv(rows, block_m), _cdiv(weight.out_features, _BLOCK_N))
    _kernel()[grid](
        flat,
        weight.packed,
        weight.absmax,
        weight.absmax2,
        weight.code2,
        weight.code,
        bias if bias is not None else out,
        out,
        rows,
        weight.out_features,
        weight.offset,
        flat.stride(0),
        out.stride(0),
        K_BLOCKS=weight.in_features // NF4_BLOCK,
        BLOCK2=weight.block2,
        NESTED=weight.nested,
        ROUNDING=weight.rounding,
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=_BLOCK_N,
        HALF=_HALF,
    )
    return out.view(*x.shape[:-1], weight.out_features)
