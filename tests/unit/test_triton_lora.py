"""The Triton LoRA kernels (`triton_lora.bgmv_triton`) equal `bgmv_reference`.

Without a GPU the kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment before
triton is first imported in the process: Triton wraps its own library functions (`tl.zeros`, `tl.sum`) when it
is imported, and our kernels when `triton.jit` runs. So this module sets it at the top, before anything can
import triton, on a machine without CUDA (on a GPU machine the CUDA test wants compiled kernels). When triton is
already imported by then without it (peft and bitsandbytes import triton: a whole-suite run collects
tests/parity first), the interpreter tests skip here and `test_interpreter_suite_in_a_subprocess` runs this file
again in a fresh process with TRITON_INTERPRET=1.

The interpreter has no bfloat16 `tl.dot` (it multiplies the raw bits: triton-lang/triton#11584), so bf16 runs
the BGMV kernels here and the SGMV ones only on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from adapterd.server.model import lora as lora_module
from adapterd.server.model import triton_lora
from adapterd.server.model.batch import LoraBatch
from adapterd.server.model.lora import bgmv_reference, lora_delta
from adapterd.server.model.triton_lora import bgmv_triton, lora_triton, triton_available
from tests.triton_runs import compile_for_sm90, run_interpreted

pytest.importorskip("triton")

INTERPRETED = triton_lora.interpreted()
# When triton was imported before TRITON_INTERPRET=1 could be set (a whole-suite run), these tests are
# deselected (tests/conftest.py), not skipped one by one, and test_interpreter_suite_in_a_subprocess runs them.
needs_interpreter = pytest.mark.triton_interpreter

# (B, T, in, out, R, rank, slots): a has S = 4 slots. Decode (T = 1) and prefill (T > 1), B = 1 up, rank < R,
# non-power-of-2 sizes, repeated slots and rows without adapter.
NUM_SLOTS = 4
CASE_ARGS = ("batch", "tokens", "in_features", "out_features", "max_rank", "rank", "slots")
CASES = [
    pytest.param(1, 1, 16, 16, 8, 8, [1], id="decode-B1"),
    pytest.param(1, 1, 33, 47, 8, 5, [0], id="decode-B1-odd"),
    pytest.param(6, 1, 100, 70, 16, 16, [0, -1, 2, 2, 3, -1], id="decode-mixed"),
    pytest.param(3, 1, 24, 24, 4, 1, [-1, -1, -1], id="decode-no-adapter-rank1"),
    pytest.param(1, 9, 40, 24, 16, 3, [3], id="prefill-B1"),
    pytest.param(4, 5, 65, 130, 32, 17, [2, -1, 0, 2], id="prefill-mixed"),
    pytest.param(1, 67, 48, 40, 64, 64, [2], id="prefill-two-m-tiles-full-rank"),
]
# Half precision is compared with the reference computed in fp32 from the same (rounded) inputs: the kernels
# accumulate in fp32 and round once, so they are within about one output ulp of it.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}

# On the GPU: 4096-long fp32 sums in another order, and SGMV rounds the [N, rank] intermediate to fp16/bf16
# before its tensor-core expand (as the reference's bmm does).
CUDA_TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 5e-3, "atol": 5e-3},
    torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
}


def make_inputs(
    batch: int,
    tokens: int,
    in_features: int,
    out_features: int,
    max_rank: int,
    rank: int,
    dtype,
    seed: int = 0,
):
    """Values of order 1 in the delta: x ~ N(0, 1), A scaled by 1/sqrt(in), B by 1/sqrt(rank)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, in_features, generator=generator)
    a = torch.randn(NUM_SLOTS, in_features, max_rank, generator=generator) / in_features**0.5
    b = torch.randn(NUM_SLOTS, max_rank, out_features, generator=generator) / max(rank, 1) ** 0.5
    return x.to(dtype), a.to(dtype), b.to(dtype)


def expected(x, a, b, slots, rank) -> torch.Tensor:
    return bgmv_reference(x.float(), a.float(), b.float(), slots, rank).to(x.dtype)


def check_against_reference(x, a, b, slots, rank, kernel):
    got = lora_triton(x, a, b, slots, rank, kernel=kernel)
    assert got.shape == (*x.shape[:2], b.shape[2]) and got.dtype == x.dtype
    torch.testing.assert_close(got, expected(x, a, b, slots, rank), **TOLERANCES[x.dtype])
    assert torch.all(got[slots < 0] == 0), "rows without adapter must be exact zeros"
    if x.dtype == torch.float32:  # the reference itself, in the same dtype
        torch.testing.assert_close(got, bgmv_reference(x, a, b, slots, rank), **TOLERANCES[x.dtype])


@needs_interpreter
@pytest.mark.parametrize("kernel", ["bgmv", "sgmv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_kernels_match_reference(
    batch, tokens, in_features, out_features, max_rank, rank, slots, dtype, kernel
):
    if dtype == torch.bfloat16 and kernel == "sgmv":
        pytest.skip(
            "Triton's interpreter has no bfloat16 tl.dot (triton-lang/triton#11584); GPU test covers it"
        )
    x, a, b = make_inputs(batch, tokens, in_features, out_features, max_rank, rank, dtype)
    check_against_reference(x, a, b, torch.tensor(slots), rank, kernel)


@needs_interpreter
@pytest.mark.parametrize("mode", ["loop", "split"])
@pytest.mark.parametrize("kernel", ["bgmv", "sgmv"])
@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_shrink_loop_and_split(
    batch, tokens, in_features, out_features, max_rank, rank, slots, kernel, mode, monkeypatch
):
    """The shrink's `in` dimension in blocks of 16 (as shipped these shapes fit one block): looped over by one
    program ("loop"), or shared by 3 programs that each take every third block and add atomically ("split")."""
    monkeypatch.setattr(triton_lora, "_BGMV_MAX_BLOCK_K", 16)
    monkeypatch.setattr(triton_lora, "_SGMV_MAX_BLOCK_K", 16)
    monkeypatch.setattr(triton_lora, "_FORCE_SPLIT_K", 1 if mode == "loop" else 3)
    x, a, b = make_inputs(batch, tokens, in_features, out_features, max_rank, rank, torch.float32, seed=3)
    check_against_reference(x, a, b, torch.tensor(slots), rank, kernel)


@needs_interpreter
@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_bgmv_triton_is_a_drop_in_for_the_reference(
    batch, tokens, in_features, out_features, max_rank, rank, slots
):
    """Same signature, same result; T == 1 picks the BGMV kernels, T > 1 the SGMV ones."""
    x, a, b = make_inputs(batch, tokens, in_features, out_features, max_rank, rank, torch.float32, seed=1)
    slot_tensor = torch.tensor(slots)
    torch.testing.assert_close(
        bgmv_triton(x, a, b, slot_tensor, rank),
        bgmv_reference(x, a, b, slot_tensor, rank),
        rtol=1e-5,
        atol=1e-5,
    )


@needs_interpreter
@pytest.mark.parametrize("kernel", ["bgmv", "sgmv"])
def test_strided_inputs(kernel):
    """Non-contiguous x, a and b (strides are passed to the kernels, not assumed)."""
    x_wide, a_wide, b_wide = make_inputs(3, 4, 2 * 36, 2 * 50, 24, 12, torch.float32, seed=2)
    x = x_wide[:, :, ::2]  # in stride 2
    a = a_wide[:, :36, 4:20]  # R = 16 of a wider slot
    b = b_wide[:, 4:20, 1:51]
    slots = torch.tensor([2, 0, -1])
    torch.testing.assert_close(
        lora_triton(x, a, b, slots, 12, kernel=kernel),
        bgmv_reference(x, a, b, slots, 12),
        rtol=1e-5,
        atol=1e-5,
    )


def test_rank_zero_and_empty_batch():
    x, a, b = make_inputs(2, 3, 16, 8, 4, 4, torch.float32)
    assert torch.equal(bgmv_triton(x, a, b, torch.tensor([0, 1]), 0), torch.zeros(2, 3, 8))
    assert bgmv_triton(x[:0], a, b, torch.tensor([], dtype=torch.long), 4).shape == (0, 3, 8)


def test_rejects_bad_arguments():
    x, a, b = make_inputs(2, 1, 16, 8, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="rank"):
        bgmv_triton(x, a, b, torch.tensor([0, 1]), 5)
    with pytest.raises(ValueError, match="slots"):
        bgmv_triton(x, a, b, torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="dtype"):
        bgmv_triton(x.half(), a, b, torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="not one of"):
        bgmv_triton(x.double(), a.double(), b.double(), torch.tensor([0, 1]), 4)


def test_interpreter_suite_in_a_subprocess():
    """Runs this file's interpreter tests in a fresh process with TRITON_INTERPRET=1 when this one cannot."""
    if INTERPRETED:
        pytest.skip("the interpreter tests run in this process")
    selection = "match_reference or loop_and_split or drop_in or strided or need_the_interpreter"
    assert " skipped" in run_interpreted(__file__, "-k", selection)  # bf16 SGMV only


def test_cpu_tensors_need_the_interpreter():
    assert triton_available()
    x, a, b = make_inputs(2, 1, 16, 8, 4, 4, torch.float32)
    if INTERPRETED:
        assert bgmv_triton(x, a, b, torch.tensor([0, 1]), 4).shape == (2, 1, 8)
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            bgmv_triton(x, a, b, torch.tensor([0, 1]), 4)


def test_lora_delta_on_cpu_keeps_the_reference():
    """On CPU the model never runs the (interpreted) kernels: for prefill rows lora_delta is bgmv_reference,
    bit for bit (decode rows take the C++ kernel or bgmv_embedding_bag: test_cpu_lora.py, test_lora_op.py)."""
    x, a, b = make_inputs(3, 2, 16, 8, 4, 4, torch.float32)
    slots = torch.tensor([1, -1, 2])
    assert torch.equal(lora_delta(x, a, b, LoraBatch(slots, 4)), bgmv_reference(x, a, b, slots, 4))


def test_imports_without_triton():
    """Without triton the modules import, report it, and lora_delta falls back to the reference."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from adapterd.server.model.batch import LoraBatch\n"
        "from adapterd.server.model.lora import bgmv_reference, lora_delta\n"
        "from adapterd.server.model.triton_lora import triton_available\n"
        "assert not triton_available()\n"
        "x, a, b, s = torch.randn(2, 1, 8), torch.randn(3, 8, 4), torch.randn(3, 4, 6), torch.tensor([2, -1])\n"
        "torch.testing.assert_close(lora_delta(x, a, b, LoraBatch(s, 4)), bgmv_reference(x, a, b, s, 4))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# Compiles the kernels for an H100/H200 (sm_90) without a GPU: Triton's frontend, its passes and the ptxas it
# ships, i.e. everything the interpreter does not check. A fresh process, because an interpreting one (see the
# module docstring) cannot make compiled kernels.
COMPILE_SCRIPT = """
import inspect, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as error:
    print("SKIP", error); sys.exit(0)
from adapterd.server.model import triton_lora

kernels = triton_lora._kernels()
count = 0
for dt in ("bf16", "fp32"):  # fp16 compiles as bf16 does
    ins = {"x_ptr": "*" + dt, "a_ptr": "*" + dt, "out_ptr": "*fp32", "slots_ptr": "*i64"}
    outs = {"s_ptr": "*fp32", "b_ptr": "*" + dt, "out_ptr": "*" + dt, "slots_ptr": "*i64"}
    ieee = dt == "fp32"
    for name, ptrs, constexprs in [
        ("bgmv_shrink", ins, dict(in_features=4096, BLOCK_K=256, BLOCK_R=16, SPLIT_K=8)),
        ("bgmv_shrink", ins, dict(in_features=14336, BLOCK_K=32, BLOCK_R=128, SPLIT_K=1)),
        ("bgmv_expand", outs, dict(BLOCK_N=256, BLOCK_R=16)),
        ("sgmv_shrink", ins, dict(in_features=4096, BLOCK_M=64, BLOCK_K=64, BLOCK_R=16, SPLIT_K=4, IEEE=ieee)),
        ("sgmv_shrink", ins, dict(in_features=14336, BLOCK_M=16, BLOCK_K=32, BLOCK_R=128, SPLIT_K=1, IEEE=ieee)),
        ("sgmv_expand", outs, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_R=16, IEEE=ieee)),
    ]:
        params = list(inspect.signature(kernels[name].fn).parameters)
        signature = {
            p: "constexpr" if p in constexprs else ptrs[p] if p.endswith("_ptr") else "i32" for p in params
        }
        try:
            source = ASTSource(
                kernels[name], signature, constexprs={(params.index(k),): v for k, v in constexprs.items()}
            )
        except TypeError as error:  # another Triton's ASTSource
            print("SKIP", error); sys.exit(0)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], name
        count += 1
print("COMPILED", count)
"""


def test_kernels_compile_for_sm90(tmp_path):
    assert "COMPILED 12" in compile_for_sm90(COMPILE_SCRIPT, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU, compiled kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("batch", "tokens"), [(64, 1), (8, 64), (3, 17)], ids=["decode", "prefill", "odd"])
def test_cuda_realistic_sizes(batch, tokens, dtype, monkeypatch):
    """Llama-3.1-8B MLP shape (4096 -> 14336), rank 16 in slots of R = 32, mixed slots, compiled kernels."""
    in_features, out_features, max_rank, rank, num_slots = 4096, 14336, 32, 16, 8
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, tokens, in_features, generator=generator, device="cuda").to(dtype)
    a = (torch.randn(num_slots, in_features, max_rank, generator=generator, device="cuda") / 64).to(dtype)
    b = (torch.randn(num_slots, max_rank, out_features, generator=generator, device="cuda") / 4).to(dtype)
    slots = torch.arange(batch, device="cuda") % (num_slots + 1) - 1  # every slot, repeated, and -1
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the fp32 reference in true fp32
    reference = bgmv_reference(x.float(), a.float(), b.float(), slots, rank).to(dtype)
    got = bgmv_triton(x, a, b, slots, rank)
    assert got.is_cuda and got.dtype == dtype
    torch.testing.assert_close(got, reference, **CUDA_TOLERANCES[dtype])
    assert torch.all(got[slots < 0] == 0)
    # lora_delta takes the Triton path on CUDA (split-K atomics: equal up to summation order) ...
    batch_slots = LoraBatch(slots, rank)
    torch.testing.assert_close(lora_delta(x, a, b, batch_slots), reference, **CUDA_TOLERANCES[dtype])
    # ... and plain torch ops with ADAPTERD_LORA_KERNEL=torch.
    torch_ops = lora_delta(x, a, b, batch_slots, kernels=lora_module.TORCH_OPS)
    torch.testing.assert_close(torch_ops, reference, **CUDA_TOLERANCES[dtype])
