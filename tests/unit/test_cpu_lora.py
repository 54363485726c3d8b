"""The CPU decode LoRA kernel (server/model/cpu_lora.cpp) adds PEFT's per-row delta, as the torch ops do."""

from __future__ import annotations

import shutil

import pytest
import torch

from adapterd.server.model import cpu_lora
from adapterd.server.model import lora as lora_module
from adapterd.server.model.batch import LoraBatch
from tests.unit.test_lora_op import IN, MAX_RANK, NUM_SLOTS, Adapter, fill, make_layer, per_row_reference

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the kernel"
)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_lora.kernel() is not None, "a compiler is here, so the kernel must build"


def sharing_linears(count: int, ranks: dict[int, int], seed: int) -> tuple[list, list]:
    """`count` float32 linears whose A lie side by side in one stack, as the engine keeps q/k/v (3) and
    gate/up (2); each with its own adapters of the given ranks per slot."""
    stack = torch.zeros(NUM_SLOTS, IN, count * MAX_RANK)
    layers, adapters = [], []
    for position in range(count):
        layer = make_layer(torch.float32)
        assert layer.lora_b is not None
        first = position * MAX_RANK
        layer.use_slots(stack[:, :, first : first + MAX_RANK], layer.lora_b, stack, first)
        own = {
            slot: Adapter(rank, seed=seed + 10 * position + slot, dtype=torch.float32)
            for slot, rank in ranks.items()
        }
        fill(layer, own)
        layers.append(layer)
        adapters.append(own)
    return layers, adapters


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize(
    "slots", [[0, 1, 2, -1], [2, 2, 0], [-1, -1], [1], [3, 0, 3, 1, 2, -1, 0], [0, 3, -1], [0, 0], [3, 3]]
)
def test_kernel_adds_the_per_row_delta(count: int, slots: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks 4, 12, 16 and 64 (= the slots' width) in one batch, rows without adapter untouched, 1-3 linears
    sharing one A stack; a batch's rank picks the columns the shrink reads (8, 16 or 64 of a 64-wide
    block; 12 takes 16): the kernel's result equals PEFT's formula, and it is the kernel that ran."""
    layers, adapters = sharing_linears(count, {0: 4, 1: 16, 2: 64, 3: 12}, seed=1)
    calls = []
    add = cpu_lora.add_lora_
    monkeypatch.setattr(cpu_lora, "add_lora_", lambda *args: calls.append(1) or add(*args))
    x = torch.randn(len(slots), 1, IN)
    rank = max((adapters[0][s].a.shape[0] for s in slots if s >= 0), default=0)
    batch = LoraBatch(torch.tensor(slots), rank)
    for layer, own in zip(layers, adapters, strict=True):
        expected = layer.base(x) + per_row_reference(x, slots, own)
        torch.testing.assert_close(layer(x, batch), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == (count if rank else 0)


def test_kernel_and_torch_ops_agree_on_the_engines_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same step through the kernel and through `bgmv_embedding_bag` (ADAPTERD_LORA_KERNEL=torch)."""
    layers, _ = sharing_linears(3, {0: 16, 1: 16, 2: 16, 3: 8}, seed=7)
    x = torch.randn(6, 1, IN)
    batch_slots = torch.tensor([3, 1, -1, 0, 2, 1])
    ours = [layer(x, LoraBatch(batch_slots, 16)) for layer in layers]
    for layer in layers:
        monkeypatch.setattr(layer, "kernels", lora_module.TORCH_OPS)
    theirs = [layer(x, LoraBatch(batch_slots, 16)) for layer in layers]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_a_slot_outside_the_stacks() -> None:
    layers, _ = sharing_linears(2, {0: 16}, seed=3)
    layer = layers[0]
    assert layer.lora_rows is not None
    y, x = torch.zeros(1, 1, layer.out_features), torch.randn(1, 1, IN)
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_lora.add_lora_(y, x, layer.lora_rows, LoraBatch(torch.tensor([NUM_SLOTS]), 16))
    assert torch.equal(y, torch.zeros_like(y))


def test_kernel_on_slots_no_compiled_variant_fits() -> None:
    """max_rank 12 (blocks of 12 columns, no compiled variant): the generic shrink gives the same delta."""
    from torch import nn

    from adapterd.server.model.lora import LoRALinear

    generator = torch.Generator().manual_seed(5)
    stack = torch.zeros(3, IN, 2 * 12)
    layers = []
    for position in range(2):
        layer = LoRALinear(nn.Linear(IN, 40), IN, 40)
        b = torch.zeros(3, 12, 40)
        layer.use_slots(stack[:, :, 12 * position : 12 * position + 12], b, stack, 12 * position)
        layers.append(layer)
    for slot in range(3):
        for layer in layers:
            assert layer.lora_a is not None and layer.lora_b is not None
            layer.lora_a[slot, :, :10] = torch.randn(IN, 10, generator=generator)
            layer.lora_b[slot, :10] = torch.randn(10, 40, generator=generator)
    x, slots = torch.randn(4, 1, IN, generator=generator), torch.tensor([2, -1, 0, 1])
    for layer in layers:
        assert layer.lora_a is not None and layer.lora_b is not None
        reference = lora_module.bgmv_reference(x, layer.lora_a, layer.lora_b, slots, 10)
        torch.testing.assert_close(
            layer(x, LoraBatch(slots, 10)), layer.base(x) + reference, rtol=1e-5, atol=1e-5
        )


def test_kernel_serves_a_batch_of_one_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row on one adapter (the engine sets shared_slot): the kernel runs, and adds what the two plain
    matmuls of the torch path add."""
    layers, adapters = sharing_linears(3, {1: 16, 2: 64}, seed=11)
    calls = []
    add = cpu_lora.add_lora_
    monkeypatch.setattr(cpu_lora, "add_lora_", lambda *args: calls.append(1) or add(*args))
    x = torch.randn(5, 1, IN)
    for layer, own in zip(layers, adapters, strict=True):
        expected = layer.base(x) + per_row_reference(x, [2] * 5, own)
        torch.testing.assert_close(
            layer(x, LoraBatch(torch.full((5,), 2), 64, 2)), expected, rtol=1e-5, atol=1e-5
        )
    assert len(calls) == 3
