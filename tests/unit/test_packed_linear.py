"""The CPU's oneDNN-packed linears compute what `F.linear` computes, as exactly as fp32 allows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapterd.server.model import loader
from adapterd.server.model.batch import ForwardBatch, LoraBatch
from adapterd.server.model.llama import KVCache, LlamaModel
from adapterd.server.model.loader import Placement, load_model
from adapterd.server.model.packed_linear import PackedLinear, cpu_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("shape", [(1, 96), (8, 96), (300, 96), (2, 5, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_is_as_close_to_the_exact_product_as_f_linear(
    shape: tuple[int, ...], bias: bool
) -> None:
    """Two fp32 ways of one product disagree in the last bits; float64 says which is right: both are, each
    within fp32 rounding of the exact result, and oneDNN's error is of the same size as MKL's."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 96, generator=generator)
    b = torch.randn(200, generator=generator) if bias else None
    x = torch.randn(*shape, generator=generator)
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    with torch.inference_mode():
        ours = PackedLinear(weight, b)(x)
    theirs = F.linear(x, weight, b)
    assert ours.shape == theirs.shape == exact.shape and ours.dtype == torch.float32
    bound = 96 * torch.finfo(torch.float32).eps * (x.abs().double() @ weight.abs().double().t()).max().item()
    ours_error = (ours.double() - exact).abs().max().item()
    theirs_error = (theirs.double() - exact).abs().max().item()
    assert ours_error <= bound and theirs_error <= bound
    assert ours_error <= 4 * theirs_error + 1e-12


def test_cpu_linear_only_packs_what_it_checked() -> None:
    weight = torch.randn(16, 8)
    assert isinstance(cpu_linear(weight, None), PackedLinear)
    assert cpu_linear(weight.bfloat16(), None) is None  # fp32 only: bf16 would round the activations


def test_loaded_model_uses_packed_linears_and_matches_plain_ones(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU model's seven linears per layer and its head are packed; the logits equal the same model's with
    plain `nn.Linear`s to fp32 rounding."""
    placement = Placement.resolve("cpu", "none")
    packed = load_model(tiny_llama, placement)
    linears = [linear.base for layer in packed.lora_linears() for linear in layer.values()]
    assert all(isinstance(module, PackedLinear) for module in [*linears, packed.lm_head])
    monkeypatch.setattr(loader, "cpu_linear", lambda weight, bias: None)
    plain = load_model(tiny_llama, placement)
    assert all(
        isinstance(linear.base, nn.Linear) for layer in plain.lora_linears() for linear in layer.values()
    )
    ours, theirs = prefill_logits(packed, [5, 9, 2, 7]), prefill_logits(plain, [5, 9, 2, 7])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()


def prefill_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """The next-token logits after prefilling `ids` as one row, no adapter."""
    n = len(ids)
    kv = KVCache(model.config, n, torch.float32, torch.device("cpu"))
    none = torch.tensor([-1])
    batch = ForwardBatch(
        input_ids=torch.tensor([ids]),
        positions=torch.arange(n)[None],
        write_index=torch.arange(n),
        real_tokens=None,
        read_slots=torch.arange(n)[None],
        attn_mask=torch.ones(n, n, dtype=torch.bool).tril()[None, None],
        last_index=torch.tensor([n - 1]),
        lora=LoraBatch(none, 0),
        prompt_slots=none,
        prompt_lengths=torch.tensor([0]),
        has_soft_prompts=False,
    )
    return model(batch, kv)
