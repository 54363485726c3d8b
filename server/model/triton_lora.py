"""Batched-gather LoRA kernels in Triton: BGMV for decode, SGMV-style segments for prefill (Punica / vLLM style).

`bgmv_triton(x, a, b, slots, rank)` computes exactly what `lora.bgmv_reference` computes, for the same
arguments: x [B, T, in], a [S, in, R], b [S, R, out] (the LoRA scale folded into b), slots [B] long (-1: no
adapter for that row) -> delta [B, T, out], delta[i] = x[i] @ a[slots[i], :, :rank] @ b[slots[i], :rank, :]
or 0. It runs as two kernels over the flattened tokens [N = B*T, in]:

- *shrink*: `x @ A[slot]` -> an fp32 buffer [N, BLOCK_R] (BLOCK_R >= rank, the padding columns are 0);
- *expand*: `buffer @ B[slot]` -> delta [N, out], written in x's dtype (rows without adapter get zeros).

Token n belongs to row n // T, whose slot is read once per program: the adapter weights are gathered by
pointer arithmetic, never copied. A row with slot -1 skips all loads and multiplies. Two shapes of each kernel:

- *BGMV* (T == 1, decode): one program per token (per token and block of `out` for the expand); the rank
  dimension is reduced with an elementwise multiply and `tl.sum`, so any rank works and nothing needs a block
  dimension >= 16. The shrink splits the `in` dimension across programs (`SPLIT_K`, fp32 `tl.atomic_add`)
  when there are too few tokens to fill the GPU.
- *SGMV* (T > 1, prefill): one program per (row, BLOCK_M tokens of that row[, out block]); every token of a
  row shares the row's adapter, so a tile of BLOCK_M tokens is one `tl.dot` against one A (or B) tile, read
  once per tile instead of once per token. Every `tl.dot` dimension is >= 16 (the rank block is padded to 16
  and masked).

Inputs are fp16, bf16 or fp32 (`SUPPORTED_DTYPES`), accumulated in fp32; fp32 products use
`input_precision="ieee"` (no TF32). Masks handle any `in`/`out` and any `rank <= R`. The shrink's
`in_features` is a compile-time constant (one compile per distinct layer width, a handful per model): a fixed
trip count for its loop, and Triton 3.6's interpreter under numpy >= 2.4 cannot take a loop bound from a
kernel argument. Only long-stable `triton.language` APIs are used (`load`/`store`/`atomic_add`/`dot`/`sum`/
`arange`/`program_id`/`zeros`); checked with triton 3.9 and 3.6, in the interpreter and compiled for sm_90.

Triton is imported lazily: this module imports without triton (`triton_available()` says whether it is
there), and the kernels are JIT-wrapped on first use. With TRITON_INTERPRET=1 set before triton is first
imported, they run in Triton's interpreter (numpy on the host, CPU tensors accepted): that is how the unit
tests check them against `bgmv_reference` on a machine without a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

# Bound by `_kernels()` on first use: the kernel bodies below resolve `tl` from this module's globals when
# Triton compiles (or interprets) them. Their `tl.constexpr` annotations stay strings (postponed annotations),
# which is how Triton reads them anyway.
tl: Any = None

# Programs the shrink aims to launch before it splits the `in` dimension (a few waves of a large GPU).
_SHRINK_TARGET_PROGRAMS = 512
_MIN_DOT = 16  # tl.dot needs every block dimension >= 16
# Largest `in` block of a shrink step (BGMV, SGMV); tests lower them, and set _FORCE_SPLIT_K, to reach the
# multi-step and split paths on small shapes.
_BGMV_MAX_BLOCK_K = 256
_SGMV_MAX_BLOCK_K = 64
_FORCE_SPLIT_K: int | None = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """True when Triton can be imported (it may still lack a GPU; the interpreter runs on CPU)."""
    try:
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Kernel bodies (plain functions; `_kernels()` wraps them with triton.jit)
# ---------------------------------------------------------------------------------------------------------------


def _bgmv_shrink(
    x_ptr,
    a_ptr,
    out_ptr,
    slots_ptr,
    tokens_per_row,
    in_features: tl.constexpr,
    rank,
    stride_xn,
    stride_xk,
    stride_as,
    stride_ak,
    stride_ar,
    stride_on,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """out[n, :BLOCK_R] (+)= x[n, k-blocks of this split] @ A[slot(n), k-blocks, :rank]; grid (N, SPLIT_K)."""
    token = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot = tl.load(slots_ptr + token // tokens_per_row)
    if slot >= 0:
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        x_row = x_ptr + token.to(tl.int64) * stride_xn
        a_slot = a_ptr + slot.to(tl.int64) * stride_as
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, in_features, SPLIT_K * BLOCK_K):
            k = k0 + pid_k * BLOCK_K + offs_k
            k_mask = k < in_features
            xv = tl.load(x_row + k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
            av = tl.load(
                a_slot + k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                mask=k_mask[:, None] & r_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(xv[:, None] * av, axis=0)
        out = out_ptr + token.to(tl.int64) * stride_on + offs_r
        if SPLIT_K == 1:
            tl.store(out, acc)
        else:
            tl.atomic_add(out, acc)


def _bgmv_expand(
    s_ptr,
    b_ptr,
    out_ptr,
    slots_ptr,
    tokens_per_row,
    out_features,
    rank,
    stride_sn,
    stride_bs,
    stride_br,
    stride_bo,
    stride_on,
    stride_oo,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[n, block] = s[n, :rank] @ B[slot(n), :rank, block], zeros for slot -1; grid (N, cdiv(out, BLOCK_N))."""
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    out = out_ptr + token.to(tl.int64) * stride_on + offs_n * stride_oo
    slot = tl.load(slots_ptr + token // tokens_per_row)
    if slot >= 0:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        sv = tl.load(s_ptr + token.to(tl.int64) * stride_sn + offs_r, mask=r_mask, other=0.0)
        bv = tl.load(
            b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bo,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.sum(sv[:, None] * bv, axis=0)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(out, tl.zeros((BLOCK_N,), dtype=out_ptr.dtype.element_ty), mask=n_mask)


def _sgmv_shrink(
    x_ptr,
    a_ptr,
    out_ptr,
    slots_ptr,
    tokens_per_row,
    in_features: tl.constexpr,
    rank,
    stride_xn,
    stride_xk,
    stride_as,
    stride_ak,
    stride_ar,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """out[row's tokens tile, :BLOCK_R] (+)= x[tile, k] @ A[slot(row), k, :rank]; grid (B, cdiv(T, BLOCK_M), SPLIT_K)."""
    row = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(slots_ptr + row)
    if slot >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < tokens_per_row
        tokens = row.to(tl.int64) * tokens_per_row + offs_m
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        a_slot = a_ptr + slot.to(tl.int64) * stride_as
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, SPLIT_K * BLOCK_K):
            k = k0 + pid_k * BLOCK_K + offs_k
            k_mask = k < in_features
            xt = tl.load(
                x_ptr + tokens[:, None] * stride_xn + k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            at = tl.load(
                a_slot + k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                mask=k_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            if IEEE:
                acc += tl.dot(xt, at, input_precision="ieee")
            else:
                acc += tl.dot(xt, at)
        out = out_ptr + tokens[:, None] * stride_on + offs_r[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=m_mask[:, None])
        else:
            tl.atomic_add(out, acc, mask=m_mask[:, None])


def _sgmv_expand(
    s_ptr,
    b_ptr,
    out_ptr,
    slots_ptr,
    tokens_per_row,
    out_features,
    rank,
    stride_sn,
    stride_bs,
    stride_br,
    stride_bo,
    stride_on,
    stride_oo,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    """out[tile, block] = s[tile, :rank] @ B[slot(row), :rank, block]; grid (B, cdiv(T, BLOCK_M), cdiv(out, BLOCK_N))."""
    row = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < tokens_per_row
    tokens = row.to(tl.int64) * tokens_per_row + offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    out = out_ptr + tokens[:, None] * stride_on + offs_n[None, :] * stride_oo
    out_mask = m_mask[:, None] & n_mask[None, :]
    slot = tl.load(slots_ptr + row)
    if slot >= 0:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        st = tl.load(
            s_ptr + tokens[:, None] * stride_sn + offs_r[None, :],
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        bt = tl.load(
            b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bo,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if IEEE:  # noqa: SIM108 (kept as a constexpr if: one branch compiled)
            acc = tl.dot(st, bt, input_precision="ieee")
        else:
            acc = tl.dot(st.to(bt.dtype), bt)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty), mask=out_mask)


@functools.cache
def _kernels() -> dict[str, Any]:
    """Import Triton and wrap the kernel bodies with `triton.jit` (once).

    With TRITON_INTERPRET=1 in the environment `triton.jit` returns interpreted functions (numpy on the host),
    the only way to run them on CPU tensors. Triton reads the variable at each `triton.jit`, and its own
    library functions (`tl.zeros`, `tl.sum`, ...) are wrapped when triton is imported: it must be set before
    `import triton` anywhere in the process (peft and bitsandbytes import it), not just before this call.
    """
    global tl
    import triton
    import triton.language

    tl = triton.language
    bodies = {
        "bgmv_shrink": _bgmv_shrink,
        "bgmv_expand": _bgmv_expand,
        "sgmv_shrink": _sgmv_shrink,
        "sgmv_expand": _sgmv_expand,
    }
    return {name: triton.jit(fn) for name, fn in bodies.items()}


def interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 set before triton's import).

    Both ours and the library functions they call (`tl.zeros`, `tl.sum`) must be interpreted ones."""
    kernels = _kernels()
    return all(type(fn).__name__ == "InterpretedFunction" for fn in kernels.values()) and all(
        type(fn).__name__ != "JITFunction" for fn in (tl.zeros, tl.sum)
    )


# ---------------------------------------------------------------------------------------------------------------
# Wrapper
# ---------------------------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_k(programs: int, k_blocks: int) -> int:
    """How many programs share one token's (or tile's) `in` dimension: enough to launch a few waves."""
    if _FORCE_SPLIT_K is not None:
        return max(1, min(k_blocks, _FORCE_SPLIT_K))
    if programs >= _SHRINK_TARGET_PROGRAMS:
        return 1
    return max(1, min(k_blocks, _cdiv(_SHRINK_TARGET_PROGRAMS, programs)))


def bgmv_triton(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, rank: int
) -> torch.Tensor:
    """Batched gather matrix-vector LoRA delta with Triton kernels; same arguments and result as `bgmv_reference`.

    x: [B, T, in], a: [S, in, R], b: [S, R, out], slots: [B] (-1 = no adapter) -> [B, T, out] in x's dtype.
    T == 1 (decode) runs the BGMV kernels, T > 1 (prefill) the SGMV-style segment kernels. CPU tensors need
    Triton's interpreter (TRITON_INTERPRET=1 before triton is imported; slow, for tests).
    """
    return lora_triton(x, a, b, slots, rank)


def lora_triton(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    rank: int,
    kernel: str = "auto",
) -> torch.Tensor:
    """`bgmv_triton` with the kernel shape chosen by hand: "auto", "bgmv" (per token) or "sgmv" (per row tile)."""
    if kernel not in ("auto", "bgmv", "sgmv"):
        raise ValueError(f"kernel must be 'auto', 'bgmv' or 'sgmv', not {kernel!r}")
    if x.dim() != 3 or a.dim() != 3 or b.dim() != 3:
        raise ValueError("x, a and b must be 3-D: [B, T, in], [S, in, R], [S, R, out]")
    batch, tokens_per_row, in_features = x.shape
    num_slots, a_in, max_rank = a.shape
    out_features = b.shape[2]
    if a_in != in_features or b.shape[0] != num_slots or b.shape[1] != max_rank:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}")
    if not 0 <= rank <= max_rank:
        raise ValueError(f"rank {rank} is outside 0..{max_rank}")
    if slots.shape != (batch,):
        raise ValueError(f"slots must have shape ({batch},), not {tuple(slots.shape)}")
    if x.dtype != a.dtype or x.dtype != b.dtype:
        raise ValueError(f"x, a and b must share one dtype, not {x.dtype}, {a.dtype}, {b.dtype}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")

    num_tokens = batch * tokens_per_row
    delta = torch.empty(batch, tokens_per_row, out_features, dtype=x.dtype, device=x.device)
    if num_tokens == 0 or out_features == 0:
        return delta
    if rank == 0 or in_features == 0:
        return delta.zero_()

    if not x.is_cuda and not interpreted():
        raise RuntimeError(
            "bgmv_triton runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 before triton "
            "is first imported in the process"
        )
    kernels = _kernels()
    flat_x = x.reshape(num_tokens, in_features)
    flat_delta = delta.view(num_tokens, out_features)
    slots = slots.to(device=x.device, dtype=torch.long).contiguous()
    if kernel == "auto":
        kernel = "bgmv" if tokens_per_row == 1 else "sgmv"

    if kernel == "bgmv":
        block_r = _pow2(rank)
        block_k = max(16, min(_pow2(in_features), 4096 // block_r, _BGMV_MAX_BLOCK_K))
        split_k = _split_k(num_tokens, _cdiv(in_features, block_k))
        shrunk = _shrink_buffer(num_tokens, block_r, split_k, x.device)
        kernels["bgmv_shrink"][(num_tokens, split_k)](
            flat_x, a, shrunk, slots, tokens_per_row, in_features, rank,
            flat_x.stride(0), flat_x.stride(1), a.stride(0), a.stride(1), a.stride(2), shrunk.stride(0),
            BLOCK_K=block_k, BLOCK_R=block_r, SPLIT_K=split_k,
        )  # fmt: skip
        block_n = max(16, min(_pow2(out_features), 4096 // block_r, 256))
        kernels["bgmv_expand"][(num_tokens, _cdiv(out_features, block_n))](
            shrunk, b, flat_delta, slots, tokens_per_row, out_features, rank,
            shrunk.stride(0), b.stride(0), b.stride(1), b.stride(2), flat_delta.stride(0), flat_delta.stride(1),
            BLOCK_N=block_n, BLOCK_R=block_r,
        )  # fmt: skip
        return delta

    ieee = x.dtype == torch.float32
    block_r = max(_MIN_DOT, _pow2(rank))
    block_m = max(_MIN_DOT, min(_pow2(tokens_per_row), 64))
    block_k = max(_MIN_DOT, min(_pow2(in_features), _SGMV_MAX_BLOCK_K if block_r <= 64 else 32))
    m_tiles = _cdiv(tokens_per_row, block_m)
    split_k = _split_k(batch * m_tiles, _cdiv(in_features, block_k))
    shrunk = _shrink_buffer(num_tokens, block_r, split_k, x.device)
    kernels["sgmv_shrink"][(batch, m_tiles, split_k)](
        flat_x, a, shrunk, slots, tokens_per_row, in_features, rank,
        flat_x.stride(0), flat_x.stride(1), a.stride(0), a.stride(1), a.stride(2), shrunk.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, SPLIT_K=split_k, IEEE=ieee,
    )  # fmt: skip
    block_n = max(_MIN_DOT, min(_pow2(out_features), 128 if block_r <= 64 else 64))
    kernels["sgmv_expand"][(batch, m_tiles, _cdiv(out_features, block_n))](
        shrunk, b, flat_delta, slots, tokens_per_row, out_features, rank,
        shrunk.stride(0), b.stride(0), b.stride(1), b.stride(2), flat_delta.stride(0), flat_delta.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=ieee,
    )  # fmt: skip
    return delta


def _shrink_buffer(num_tokens: int, block_r: int, split_k: int, device: torch.device) -> torch.Tensor:
    """The fp32 [N, BLOCK_R] intermediate; zeroed only when split programs accumulate into it atomically
    (rows without adapter are never read back)."""
    if split_k > 1:
        return torch.zeros(num_tokens, block_r, dtype=torch.float32, device=device)
    return torch.empty(num_tokens, block_r, dtype=torch.float32, device=device)
