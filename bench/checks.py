"""Before anything is timed: the fast paths agree with the reference paths on this device and model.

- Decode through CUDA graphs (on a CPU: the same padded static path, run eagerly) against eager decoding,
  on a batch mixing distinct LoRA adapters and soft prompts: the share of generated tokens that agree.
- The mixed-batch LoRA op against `bgmv_reference`, on this model's slot tensors filled with the bench's
  adapters: on CUDA the Triton kernels for a decode batch and a prefill batch, on a CPU the decode ops
  (the C++ kernel of `cpu_lora` and `bgmv_embedding_bag`): the largest error relative to the delta.
A timing of wrong code is worthless, so these come first in the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from adapterd.server.engine.engine import LLMEngine
from adapterd.server.model import cpu_lora
from adapterd.server.model.batch import LoraBatch
from adapterd.server.model.lora import LoRALinear, bgmv_embedding_bag, bgmv_reference
from adapterd.server.model.triton_lora import bgmv_triton, triton_available

from .workload import Case, random_prompts

if TYPE_CHECKING:
    from .run import Bench

NEW_TOKENS = 16


def run_checks(bench: Bench) -> dict[str, Any]:
    return {"graphs_vs_eager": graphs_vs_eager(bench), "lora_kernels": lora_kernels(bench)}


def graphs_vs_eager(bench: Bench) -> dict[str, Any]:
    case = Case("check", "LoRA + soft prompts", bench.s.batch, "soft")
    prompts = random_prompts(case.batch, bench.s.prompt_tokens, bench.vocab_size, seed=12_345)
    rows = bench.rows(case, prompts, NEW_TOKENS)
    server = bench.server
    kept = server.engine.runner.graphs
    capture = server.device.type == "cuda"

    def use_graphs(on: bool) -> None:
        def switch(engine: LLMEngine) -> None:
            if on:
                engine.use_decode_graphs(capture=capture)
            else:
                engine.runner.graphs = None

        server.loop.call(switch).result()

    try:
        use_graphs(True)
        with_graphs = server.generate(rows)
        use_graphs(False)
        eager = server.generate(rows)
    finally:
        server.loop.call(lambda engine: setattr(engine.runner, "graphs", kept)).result()
    pairs = [(a, b) for x, y in zip(with_graphs, eager, strict=True) for a, b in zip(x, y, strict=True)]
    return {
        "captured": capture,
        "rows": len(rows),
        "tokens": len(pairs),
        "token_agreement": sum(a == b for a, b in pairs) / len(pairs),
        "rows_identical": sum(x == y for x, y in zip(with_graphs, eager, strict=True)),
    }


def lora_kernels(bench: Bench) -> dict[str, Any]:
    """The mixed-batch LoRA ops this device runs: the Triton kernels on CUDA; on a CPU the decode ops, the
    C++ kernel (`cpu_lora`) and `bgmv_embedding_bag`."""
    device = bench.server.device
    if device.type == "cuda" and not triton_available():
        return {"ran": False, "op": "Triton LoRA kernels", "why": "needs Triton"}
    adapters = bench.loras[: bench.s.batch]
    server = bench.server

    def fill(engine: LLMEngine) -> None:
        for adapter in adapters:
            engine.adapters.acquire(adapter)
            engine.adapters.release(adapter)

    server.loop.call(fill).result()
    linears = bench.models.engine_model.lora_linears()[0]
    generator = torch.Generator(device="cpu").manual_seed(0)
    on_cuda = device.type == "cuda"
    shapes = ((64, 1), (4, 32)) if on_cuda else ((bench.s.batch, 1),)  # decode (BGMV), prefill (SGMV)
    errors: dict[str, float] = {}
    for name in ("q_proj", "down_proj"):
        linear = linears[name]
        a, b = linear.lora_a, linear.lora_b
        assert a is not None and b is not None
        num_slots = a.shape[0]
        for shape in shapes:
            x = torch.randn(*shape, a.shape[1], generator=generator).to(device, a.dtype)
            slots = torch.randint(-1, num_slots, (shape[0],), generator=generator).to(device)
            expected = bgmv_reference(x.float(), a.float(), b.float(), slots, bench.s.rank)
            scale = expected.abs().max().clamp(min=1e-6)
            for op, got in _fast_ops(linear, x, slots, bench.s.rank).items():
                error = float((got.float() - expected).abs().max() / scale)
                errors[f"{op}, {name} B={shape[0]} T={shape[1]}"] = error
    return {"ran": True, "max_relative_error": errors}


def _fast_ops(linear: LoRALinear, x: torch.Tensor, slots: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    a, b, rows = linear.lora_a, linear.lora_b, linear.lora_rows
    assert a is not None and b is not None
    if x.is_cuda:
        return {"Triton LoRA kernel": bgmv_triton(x, a, b, slots, rank)}
    assert rows is not None
    found = {"CPU decode LoRA (embedding_bag)": bgmv_embedding_bag(x, rows, LoraBatch(slots, rank))}
    if cpu_lora.kernel() is not None:
        zeros = torch.zeros(x.shape[0], 1, b.shape[2], dtype=x.dtype)
        found["CPU decode LoRA (C++ kernel)"] = cpu_lora.add_lora_(zeros, x, rows, LoraBatch(slots, rank))
    return found
