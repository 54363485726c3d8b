"""The fused NF4 kernel (`triton_nf4.nf4_matmul`) gives bitsandbytes' results from bitsandbytes' bytes.

The reference is what bitsandbytes computes for two rows or more on a GPU: `dequantize_4bit` of the weight,
rounded to its dtype, then `F.linear` (`MatMul4Bit`). Its CPU forward is no reference: it rounds the
activations to bf16 first (tests/parity/test_quantized_parity.py). Without a GPU the kernel runs in Triton's
interpreter (the same process rules as tests/unit/test_triton_lora.py: when triton was imported before
TRITON_INTERPRET=1 could be set, these tests are deselected and test_interpreter_suite_in_a_subprocess runs
them), and test_kernel_compiles_for_sm90 compiles it for an H100/H200 without one.

Found while writing it: the interpreter's fp32 -> bfloat16 cast truncates where a GPU's rounds to nearest
even (`test_interpreter_bf16_cast_truncates`), so the kernel rounds by hand, the same way on both.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch.nn.functional as F

pytest.importorskip("triton")
bnb = pytest.importorskip("bitsandbytes")

from adapterd.server.model import triton_nf4  # noqa: E402
from adapterd.server.model.loader import Placement, make_base_linear  # noqa: E402
from adapterd.server.model.triton_lora import interpreted  # noqa: E402
from tests.triton_runs import compile_for_sm90, run_interpreted  # noqa: E402

INTERPRETED = interpreted()
needs_interpreter = pytest.mark.triton_interpreter


def quantized_linear(
    out_features: int,
    in_features: int,
    weight_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float32,
    nested: bool = True,
    bias: bool = False,
    device: str = "cpu",
    seed: int = 0,
):
    """A bitsandbytes NF4 `Linear4bit` of a seeded random weight, placed (so quantized) on `device`."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator).to(weight_dtype)
    module = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        compress_statistics=nested,
        device="meta",
    )
    module.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", compress_statistics=nested
    )
    if bias:
        module.bias = torch.nn.Parameter(torch.randn(out_features, generator=generator), requires_grad=False)
    return module.to(device)


def bitsandbytes_reference(x: torch.Tensor, module) -> torch.Tensor:
    """bitsandbytes' batched NF4 product, its sums in fp64: x's dtype in, x's dtype out."""
    dense = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(x.dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype).double()
    return F.linear(x.double(), dense.double(), bias).to(x.dtype)


# Products over `in` terms summed in fp32 in another order: within a few fp32 ulps of the largest partial
# sums; half-precision outputs within one ulp of their own rounding.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-4},
    torch.float16: {"rtol": 2e-3, "atol": 2e-2},
}
CASE_ARGS = ("rows", "out_features", "in_features", "weight_dtype", "x_dtype", "nested", "bias")
CASES = [
    pytest.param(1, 48, 128, torch.float32, torch.float32, True, False, id="one-row"),
    pytest.param(5, 70, 192, torch.bfloat16, torch.float32, True, True, id="bf16-weight-bias-odd-out"),
    pytest.param(17, 130, 64, torch.float16, torch.float16, False, True, id="fp16-not-nested"),
    pytest.param(70, 64, 256, torch.float32, torch.float32, True, False, id="two-row-tiles"),
    pytest.param(3, 40, 256 * 5, torch.bfloat16, torch.float32, True, False, id="absmax2-blocks"),
]


@needs_interpreter
@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_kernel_matches_bitsandbytes(rows, out_features, in_features, weight_dtype, x_dtype, nested, bias):
    module = quantized_linear(out_features, in_features, weight_dtype, x_dtype, nested, bias)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).to(x_dtype)
    bias_tensor = None if module.bias is None else module.bias.to(x_dtype)
    got = triton_nf4.nf4_matmul(x, triton_nf4.nf4_operands(module.weight), bias_tensor)
    assert got.dtype == x_dtype and got.shape == (rows, out_features)
    torch.testing.assert_close(got, bitsandbytes_reference(x, module), **TOLERANCES[x_dtype])


@needs_interpreter
def test_strided_and_batched_inputs():
    module = quantized_linear(64, 128)
    operands = triton_nf4.nf4_operands(module.weight)
    x = torch.randn(2, 3, 256)[..., ::2]  # [2, 3, 128], last-dim stride 2
    got = triton_nf4.nf4_matmul(x, operands)
    assert got.shape == (2, 3, 64)
    torch.testing.assert_close(got, bitsandbytes_reference(x, module), **TOLERANCES[torch.float32])


@needs_interpreter
def test_interpreter_bf16_cast_truncates():
    """Why the kernel rounds to bfloat16 by hand: the interpreter's cast truncates (torch rounds to nearest
    even, as a GPU's cast does). Should a Triton release fix it, this test says so and the hand rounding can
    go."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16).to(tl.float32))

    x = torch.randn(256, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(x)
    cast[(1,)](x, out, N=256)
    nearest = x.to(torch.bfloat16).float()
    assert not torch.equal(out, nearest)
    assert torch.all(out.abs() <= x.abs())  # toward zero


@needs_interpreter
def test_fused_module_is_bitsandbytes_but_for_the_kernel():
    """`make_base_linear` with the triton NF4 kernel: the same quantized bytes as bitsandbytes' module;
    one row keeps bitsandbytes' own forward, more rows run the kernel."""
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(2))
    plain = make_base_linear(weight, None, Placement.resolve("cpu", "nf4"))
    fused = make_base_linear(weight, None, Placement.resolve("cpu", "nf4", "triton"))
    assert isinstance(fused, bnb.nn.Linear4bit) and fused.fused is not None
    assert torch.equal(fused.weight.data, plain.weight.data)
    assert torch.equal(fused.weight.quant_state.absmax, plain.weight.quant_state.absmax)
    one = torch.randn(1, 1, 128)
    torch.testing.assert_close(fused(one), plain(one), rtol=0, atol=0)
    many = torch.randn(4, 1, 128)
    torch.testing.assert_close(fused(many), bitsandbytes_reference(many, plain), **TOLERANCES[torch.float32])


@needs_interpreter
def test_layouts_the_kernel_does_not_read_stay_on_bitsandbytes():
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(3))  # 96 % 64 != 0
    module = make_base_linear(weight, None, Placement.resolve("cpu", "nf4", "triton"))
    assert module.fused is None and not triton_nf4.fused_supported(module.weight)
    x = torch.randn(3, 96)
    plain = make_base_linear(weight, None, Placement.resolve("cpu", "nf4"))
    torch.testing.assert_close(module(x), plain(x), rtol=0, atol=0)
    assert not triton_nf4.fused_supported(torch.nn.Parameter(torch.zeros(2, 64)))  # not a 4-bit weight


def dequantized_copy(model: Path, out: Path) -> Path:
    """`model` with every decoder linear replaced by its NF4 round trip (quantized as the loader does)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    weights = load_file(out / "model.safetensors")
    for name, weight in weights.items():
        if ".layers." in name and name.endswith("proj.weight"):
            params = bnb.nn.Params4bit(
                weight.float(), requires_grad=False, quant_type="nf4", compress_statistics=True
            ).to("cpu")
            weights[name] = bnb.functional.dequantize_4bit(params.data, params.quant_state).float()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@needs_interpreter
def test_engine_on_the_fused_kernel_equals_the_dequantized_model(tiny_llama, tmp_path, monkeypatch):
    """The whole engine (prefill and decode, three rows, one with a LoRA adapter) on NF4 through the fused
    kernel computes what the fp32 model with the dequantized weights computes: the same greedy tokens and
    log-probabilities within fp32 summation order."""
    from adapterd.server.common.config import EngineConfig
    from adapterd.server.common.protocol import GenerateRequest, SamplingParams
    from adapterd.server.llm import LLM
    from tests.reference import make_lora_adapter

    adapter = make_lora_adapter(tiny_llama, tmp_path / "lora", r=8, alpha=16, target_modules="all-linear")
    reference_model = dequantized_copy(tiny_llama, tmp_path / "dequantized")
    config = EngineConfig(max_rank=8, max_gpu_adapters=2, kv_cache_tokens=512, cuda_graphs=False)
    prompts = [(5, 6, 7, 8, 9, 11), (9, 8, 7, 6, 5), (100, 50, 25, 12)]
    requests = [
        GenerateRequest(
            prompt_ids=p,
            adapter_id="lora" if i == 1 else None,
            params=SamplingParams(max_new_tokens=6, ignore_eos=True, top_logprobs=1),
        )
        for i, p in enumerate(prompts)
    ]

    def run(model: Path, quantize: str) -> list:
        with LLM(model=str(model), quantize=quantize, device="cpu", engine=config) as llm:
            llm.add_adapter("lora", adapter)
            return llm.generate(requests)

    monkeypatch.setenv("ADAPTERD_NF4_KERNEL", "triton")
    fused = run(tiny_llama, "nf4")
    monkeypatch.delenv("ADAPTERD_NF4_KERNEL")
    reference = run(reference_model, "none")
    for ours, theirs in zip(fused, reference, strict=True):
        assert ours.token_ids == theirs.token_ids
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in ours.logprobs]),
            torch.tensor([t.logprob for t in theirs.logprobs]),
            rtol=0,
            atol=1e-4,
        )


def test_the_setting_is_checked_where_the_model_is_placed(monkeypatch):
    from adapterd.server.common.config import ModelConfig

    monkeypatch.setenv("ADAPTERD_NF4_KERNEL", "Triton ")
    assert ModelConfig().nf4_kernel == "triton"
    monkeypatch.setenv("ADAPTERD_NF4_KERNEL", "fast")
    with pytest.raises(ValueError, match="ADAPTERD_NF4_KERNEL must be bitsandbytes or triton"):
        ModelConfig()
    monkeypatch.delenv("ADAPTERD_NF4_KERNEL")
    assert ModelConfig().nf4_kernel == "bitsandbytes"
    assert Placement.resolve("cpu", "none", "triton").quantize == "none"  # nothing in NF4: nothing to check
    if INTERPRETED or torch.cuda.is_available():
        assert Placement.resolve("cpu" if INTERPRETED else "cuda", "nf4", "triton").nf4_kernel == "triton"
    else:
        with pytest.raises(ValueError, match="needs a CUDA device"):
            Placement.resolve("cpu", "nf4", "triton")


def test_interpreter_suite_in_a_subprocess():
    """Runs this file's interpreter tests in a fresh process with TRITON_INTERPRET=1 when this one cannot."""
    if INTERPRETED:
        pytest.skip("the interpreter tests run in this process")
    run_interpreted(__file__, "-m", "triton_interpreter")


# Compiles the kernel for an H100/H200 (sm_90) without a GPU, in a fresh process (an interpreting one cannot
# make compiled kernels): Triton's frontend, its passes and ptxas, what the interpreter does not check.
COMPILE_SCRIPT = """
import inspect, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as error:
    print("SKIP", error); sys.exit(0)
from adapterd.server.model import triton_nf4

kernel = triton_nf4._kernel()
params = list(inspect.signature(kernel.fn).parameters)
count = 0
for dt, rounding, nested, block_m in (("bf16", 2, True, 16), ("bf16", 2, True, 64), ("fp32", 0, False, 16)):
    ptrs = {"x_ptr": "*" + dt, "w_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
            "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "code_ptr": "*fp32", "bias_ptr": "*" + dt,
            "out_ptr": "*" + dt}
    constexprs = dict(K_BLOCKS=14336 // 64, BLOCK2=256, NESTED=nested, ROUNDING=rounding, HAS_BIAS=True,
                      IEEE=dt == "fp32", BLOCK_M=block_m, BLOCK_N=64, HALF=32)
    signature = {p: "constexpr" if p in constexprs else ptrs[p] if p.endswith("_ptr")
                 else "fp32" if p == "offset" else "i32" for p in params}
    try:
        source = ASTSource(kernel, signature, constexprs={(params.index(k),): v for k, v in constexprs.items()})
    except TypeError as error:  # another Triton's ASTSource
        print("SKIP", error); sys.exit(0)
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
    count += 1
print("COMPILED", count)
"""


def test_kernel_compiles_for_sm90(tmp_path):
    assert "COMPILED 3" in compile_for_sm90(COMPILE_SCRIPT, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU, compiled kernels")
@pytest.mark.parametrize("rows", [2, 16, 64, 256])
@pytest.mark.parametrize(("out_features", "in_features"), [(14336, 4096), (4096, 14336)], ids=["up", "down"])
def test_cuda_8b_shapes_match_bitsandbytes(rows, out_features, in_features):
    """Llama-3.1-8B MLP shapes in bf16 on the GPU: the kernel against bitsandbytes' own module forward."""
    module = quantized_linear(out_features, in_features, torch.bfloat16, torch.bfloat16, device="cuda")
    x = torch.randn(rows, in_features, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    x = x.to(torch.bfloat16)
    got = triton_nf4.nf4_matmul(x, triton_nf4.nf4_operands(module.weight))
    theirs = module(x)  # dequantize_4bit + bf16 matmul (cuBLAS)
    reference = bitsandbytes_reference(x, module)  # the same, summed in fp64
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference, rtol=1.6e-2, atol=1e-1)  # bf16 output rounding
    # No further from the exact sums than bitsandbytes itself (2x its mean error: cuBLAS may split K too).
    ours_error = (got.double() - reference.double()).abs().mean()
    their_error = (theirs.double() - reference.double()).abs().mean()
    assert ours_error <= 2 * their_error + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU, compiled kernels")
def test_cuda_graph_replays_the_fused_linear():
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(4))
    module = make_base_linear(weight, None, Placement.resolve("cuda", "nf4", "triton"))
    x = torch.randn(16, 1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = module(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = module(x)
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
