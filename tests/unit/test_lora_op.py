"""Batched LoRA from slots equals PEFT's per-row formula `x @ A.T @ B.T * scaling`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterd.server.model.batch import LoraBatch
from adapterd.server.model.lora import LoRALinear, bgmv_reference, lora_delta

IN, OUT, MAX_RANK, NUM_SLOTS = 48, 40, 64, 4
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}


class Adapter:
    """One LoRA pair as PEFT stores it: A [r, in], B [out, r], and its scaling (alpha / r)."""

    def __init__(self, rank: int, seed: int, dtype: torch.dtype) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.a = torch.randn(rank, IN, generator=generator, dtype=dtype) / IN**0.5
        self.b = torch.randn(OUT, rank, generator=generator, dtype=dtype) / rank**0.5
        self.scaling = 8 / rank**0.5  # rsLoRA with alpha 8: any value but 1 makes a wrong scale show

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T @ self.b.T * self.scaling


def make_layer(dtype: torch.dtype) -> LoRALinear:
    """A LoRALinear with its own zeroed slot stacks, laid out as the engine's: A [S, in, R], B [S, R, out]."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, dtype=dtype)
    layer = LoRALinear(base, IN, OUT)
    layer.use_slots(
        torch.zeros(NUM_SLOTS, IN, MAX_RANK, dtype=dtype), torch.zeros(NUM_SLOTS, MAX_RANK, OUT, dtype=dtype)
    )
    return layer


def set_slot(layer: LoRALinear, slot: int, adapter: Adapter | None) -> None:
    """Put an adapter's A and scaled B into `slot`, zero-padded to MAX_RANK; None clears the slot."""
    assert layer.lora_a is not None and layer.lora_b is not None
    layer.lora_a[slot].zero_()
    layer.lora_b[slot].zero_()
    if adapter is not None:
        rank = adapter.a.shape[0]
        layer.lora_a[slot, :, :rank] = adapter.a.t()
        layer.lora_b[slot, :rank, :] = (adapter.b * adapter.scaling).t()


def fill(layer: LoRALinear, adapters: dict[int, Adapter]) -> None:
    for slot, adapter in adapters.items():
        set_slot(layer, slot, adapter)


def per_row_reference(x: torch.Tensor, slots: list[int], adapters: dict[int, Adapter]) -> torch.Tensor:
    """x: [B, T, in] -> [B, T, out], one row at a time; a row with slot -1 has no adapter."""
    rows = [
        torch.zeros(x.shape[1], OUT, dtype=x.dtype) if s < 0 else adapters[s].delta(x[i])
        for i, s in enumerate(slots)
    ]
    return torch.stack(rows)


def three_ranks(dtype: torch.dtype) -> dict[int, Adapter]:
    return {
        0: Adapter(4, seed=1, dtype=dtype),
        1: Adapter(16, seed=2, dtype=dtype),
        2: Adapter(64, seed=3, dtype=dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_bgmv_equals_peft_formula_row_by_row(dtype: torch.dtype, num_tokens: int) -> None:
    """Ranks 4, 16 and 64 padded to 64, rows without an adapter, slots used by several rows, T>1."""
    layer, adapters = make_layer(dtype), three_ranks(dtype)
    fill(layer, adapters)
    slots = [0, 1, -1, 2, 1, 0, -1, 2]
    x = torch.randn(len(slots), num_tokens, IN, generator=torch.Generator().manual_seed(9), dtype=dtype)
    assert layer.lora_a is not None and layer.lora_b is not None
    delta = bgmv_reference(x, layer.lora_a, layer.lora_b, torch.tensor(slots), MAX_RANK)
    expected = per_row_reference(x, slots, adapters)
    torch.testing.assert_close(delta, expected, **TOLERANCES[dtype])
    for row in (2, 6):
        assert torch.equal(delta[row], torch.zeros(num_tokens, OUT, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bgmv_with_the_batch_max_rank_below_the_slot_size(dtype: torch.dtype) -> None:
    """The engine passes the largest rank in the batch (16 here), not the slot width."""
    layer, adapters = make_layer(dtype), three_ranks(dtype)
    fill(layer, adapters)
    slots = [1, 0, -1, 1]
    x = torch.randn(len(slots), 3, IN, generator=torch.Generator().manual_seed(4), dtype=dtype)
    assert layer.lora_a is not None and layer.lora_b is not None
    delta = bgmv_reference(x, layer.lora_a, layer.lora_b, torch.tensor(slots), 16)
    torch.testing.assert_close(delta, per_row_reference(x, slots, adapters), **TOLERANCES[dtype])


def test_every_row_in_one_slot_equals_the_formula_on_the_whole_batch() -> None:
    layer, adapters = make_layer(torch.float64), three_ranks(torch.float64)
    fill(layer, adapters)
    x = torch.randn(5, 4, IN, dtype=torch.float64)
    assert layer.lora_a is not None and layer.lora_b is not None
    delta = bgmv_reference(x, layer.lora_a, layer.lora_b, torch.full((5,), 2), MAX_RANK)
    torch.testing.assert_close(delta, adapters[2].delta(x), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_adds_each_rows_delta_to_the_base_output(dtype: torch.dtype) -> None:
    layer, adapters = make_layer(dtype), three_ranks(dtype)
    fill(layer, adapters)
    slots = [2, -1, 0, 1]
    x = torch.randn(len(slots), 5, IN, generator=torch.Generator().manual_seed(3), dtype=dtype)
    y = layer(x, LoraBatch(torch.tensor(slots), MAX_RANK))
    expected = layer.base(x) + per_row_reference(x, slots, adapters)
    torch.testing.assert_close(y, expected, **TOLERANCES[dtype])
    assert torch.equal(y[1], layer.base(x)[1])


def test_forward_with_rank_zero_or_no_slots_is_exactly_the_base_output() -> None:
    layer = make_layer(torch.float32)
    fill(layer, three_ranks(torch.float32))
    x = torch.randn(3, 2, IN)
    base = layer.base(x)
    assert torch.equal(layer(x, LoraBatch(torch.tensor([0, 1, 2]), 0)), base)
    assert torch.equal(layer(x, None), base)
    assert torch.equal(layer(x), base)
    assert torch.equal(layer(x, LoraBatch(torch.tensor([-1, -1, -1]), MAX_RANK)), base)


def test_forward_without_allocated_slots_is_exactly_the_base_output() -> None:
    base = nn.Linear(IN, OUT)
    layer = LoRALinear(base, IN, OUT)
    x = torch.randn(2, 3, IN)
    assert torch.equal(layer(x, LoraBatch(torch.tensor([0, 1]), 8)), base(x))


def test_clearing_a_slot_leaves_the_others() -> None:
    layer, adapters = make_layer(torch.float64), three_ranks(torch.float64)
    fill(layer, adapters)
    set_slot(layer, 1, None)
    slots = [0, 1, 2]
    x = torch.randn(len(slots), 2, IN, dtype=torch.float64)
    y = layer(x, LoraBatch(torch.tensor(slots), MAX_RANK))
    assert torch.equal(y[1], layer.base(x)[1])
    del adapters[1]
    expected = layer.base(x) + per_row_reference(x, [0, -1, 2], adapters)
    torch.testing.assert_close(y, expected, **TOLERANCES[torch.float64])


def test_a_smaller_adapter_replaces_a_larger_one_without_leftovers() -> None:
    layer = make_layer(torch.float64)
    fill(layer, {0: Adapter(64, seed=5, dtype=torch.float64)})
    small = Adapter(4, seed=6, dtype=torch.float64)
    fill(layer, {0: small})
    x = torch.randn(2, 3, IN, dtype=torch.float64)
    y = layer(x, LoraBatch(torch.tensor([0, 0]), MAX_RANK))
    torch.testing.assert_close(y, layer.base(x) + small.delta(x), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("rank", [4, 16, MAX_RANK])
def test_one_adapter_for_every_row_takes_the_plain_matmul_path_with_the_same_result(rank: int) -> None:
    layer, adapters = make_layer(torch.float64), three_ranks(torch.float64)
    fill(layer, adapters)
    x = torch.randn(4, 3, IN, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    slots = torch.full((4,), 1)
    assert layer.lora_a is not None and layer.lora_b is not None
    shared = lora_delta(x, layer.lora_a, layer.lora_b, LoraBatch(slots, rank, shared_slot=1))
    gathered = bgmv_reference(x, layer.lora_a, layer.lora_b, slots, rank)
    torch.testing.assert_close(shared, gathered, **TOLERANCES[torch.float64])
    if rank >= adapters[1].a.shape[0]:  # rank covers the adapter: both equal PEFT's formula
        torch.testing.assert_close(
            shared, per_row_reference(x, [1] * 4, adapters), **TOLERANCES[torch.float64]
        )


@pytest.mark.parametrize("slots", [[0, 1, 2, -1], [2, 2, 0], [-1, -1], [1], [0, 0, -1], [2, -1, 1, 2]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_embedding_bag_equals_the_gather(
    slots: list[int], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bgmv_embedding_bag (CPU decode rows, each row's slot read in place as weighted sums of its rows)
    computes bgmv_reference's delta at the batch's rank, the largest of its rows' adapters, and PEFT's
    formula per row; rows without adapter get exact zeros; lora_delta takes it for CPU decode batches."""
    from adapterd.server.model import lora as lora_module

    adapters = three_ranks(dtype)
    layer = make_layer(dtype)
    fill(layer, adapters)
    assert layer.lora_a is not None and layer.lora_b is not None
    x = torch.randn(len(slots), 1, IN, dtype=dtype)
    index = torch.tensor(slots)
    rank = max((adapters[s].a.shape[0] for s in slots if s >= 0), default=0)
    expected = per_row_reference(x, slots, adapters)
    torch.testing.assert_close(bgmv_reference(x, layer.lora_a, layer.lora_b, index, rank), expected)
    batch = LoraBatch(index, rank)
    assert layer.lora_rows is not None
    got = lora_module.bgmv_embedding_bag(x, layer.lora_rows, batch)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
    assert all(torch.equal(got[i], torch.zeros_like(got[i])) for i, s in enumerate(slots) if s < 0)
    if rank:  # the engine's rank-0 batches skip LoRA before lora_delta
        calls = []
        monkeypatch.setattr(
            lora_module, "bgmv_embedding_bag", lambda *args: calls.append(1) or got, raising=True
        )
        delta = lora_delta(x, layer.lora_a, layer.lora_b, LoraBatch(index, rank), layer.lora_rows)
        assert calls == [1] and delta is got


def test_linears_reading_one_input_shrink_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two linears whose A lie side by side in one stack (as the engine keeps q/k/v and gate/up) each get
    their own delta, from one shared shrink: three embedding_bag calls (one shrink, two expands), not four;
    a new input in the same step shrinks again."""
    stack = torch.zeros(NUM_SLOTS, IN, 2 * MAX_RANK, dtype=torch.float64)
    layers, all_adapters = [], []
    for position, seed in enumerate((10, 20)):
        layer = make_layer(torch.float64)
        first = position * MAX_RANK
        assert layer.lora_b is not None
        layer.use_slots(stack[:, :, first : first + MAX_RANK], layer.lora_b, stack, first)
        adapters = {
            slot: Adapter(rank, seed=seed + slot, dtype=torch.float64) for slot, rank in ((0, 4), (2, 16))
        }
        fill(layer, adapters)
        layers.append(layer)
        all_adapters.append(adapters)
    calls = []
    embedding_bag = torch.embedding_bag
    monkeypatch.setattr(torch, "embedding_bag", lambda *args: calls.append(1) or embedding_bag(*args))
    slots = [2, -1, 0]
    batch = LoraBatch(torch.tensor(slots), 16)
    for x in (torch.randn(3, 1, IN, dtype=torch.float64), torch.randn(3, 1, IN, dtype=torch.float64)):
        calls.clear()
        for layer, adapters in zip(layers, all_adapters, strict=True):
            expected = layer.base(x) + per_row_reference(x, slots, adapters)
            torch.testing.assert_close(layer(x, batch), expected, **TOLERANCES[torch.float64])
        assert len(calls) == 3


def test_the_kernel_setting_is_read_when_the_engine_is_configured_not_at_import(monkeypatch) -> None:
    """ADAPTERD_LORA_KERNEL is read by EngineConfig (config.py, the one place that reads the environment);
    a bad value fails there with a clear message, and importing the LoRA module never raises."""
    import subprocess
    import sys

    from adapterd.server.common.config import EngineConfig
    from adapterd.server.model.lora import TORCH_OPS, choose_kernels

    env = {"ADAPTERD_LORA_KERNEL": "bogus", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", "import adapterd.server.model.lora, adapterd.server.engine.engine"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("ADAPTERD_LORA_KERNEL", "bogus")
    with pytest.raises(ValueError, match="ADAPTERD_LORA_KERNEL must be auto, triton or torch, not 'bogus'"):
        EngineConfig()
    monkeypatch.setenv("ADAPTERD_LORA_KERNEL", "torch")
    assert EngineConfig().lora_kernel == "torch"
    assert choose_kernels("torch", torch.device("cpu"), torch.float32) == TORCH_OPS
    monkeypatch.setenv("ADAPTERD_LORA_KERNEL", "Triton")
    assert EngineConfig().lora_kernel == "auto"
