"""Adapters packed in host memory and copied into device slots: the packed views are PEFT's tensors, and a
slot holds exactly its adapter (zero past its rank and in modules it does not target) after any refill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterd.adapters.format import parse_lora_key
from adapterd.server.common.config import EngineConfig
from adapterd.server.engine.adapter_slots import LoadedAdapter
from adapterd.server.llm import LLM
from tests.reference import make_lora_adapter

MAX_RANK = 16


@pytest.fixture(scope="module")
def llm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> LLM:
    root = tmp_path_factory.mktemp("slot-adapters")
    config = EngineConfig(max_rank=MAX_RANK, max_gpu_adapters=2, kv_cache_tokens=256)
    engine = LLM(model=str(tiny_llama), quantize="none", device="cpu", engine=config)
    engine.add_adapter(
        "all16", make_lora_adapter(tiny_llama, root / "all16", r=16, alpha=8, target_modules="all-linear")
    )
    engine.add_adapter(
        "qv4",
        make_lora_adapter(
            tiny_llama, root / "qv4", r=4, alpha=16, target_modules=["q_proj", "v_proj"], seed=1
        ),
    )
    yield engine
    engine.close()


def loaded(llm: LLM, adapter_id: str) -> LoadedAdapter:
    adapter = llm.adapters.resolve(adapter_id)
    assert adapter is not None and adapter.lora is not None
    return adapter


def peft_tensors(adapter: LoadedAdapter) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, module) -> (A [r, in], B * scaling [out, r]) straight from the adapter's file."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(adapter.spec.path / "adapter_model.safetensors").items():
        parsed = parse_lora_key(name)
        assert parsed is not None
        pairs.setdefault(parsed[:2], {})[parsed[2]] = tensor
    return {key: (ab["A"], ab["B"] * adapter.spec.scaling) for key, ab in pairs.items()}


def test_packed_views_are_the_files_tensors(llm: LLM) -> None:
    for adapter_id in ("all16", "qv4"):
        adapter = loaded(llm, adapter_id)
        assert adapter.lora is not None
        expected = peft_tensors(adapter)
        assert adapter.lora.a.keys() == adapter.lora.b.keys() == expected.keys()
        for key, (a, b) in expected.items():
            assert torch.equal(adapter.lora.a[key], a.float()) and torch.allclose(
                adapter.lora.b[key], b.float()
            )
            assert adapter.lora.a[key].data_ptr() >= adapter.lora.flat.data_ptr()  # a view, not a copy
        used = sum(a.numel() + b.numel() for a, b in expected.values())
        assert adapter.lora.flat.numel() == used


def check_slot(llm: LLM, slot: int, adapter: LoadedAdapter | None) -> None:
    expected = peft_tensors(adapter) if adapter else {}
    for layer_index, layer in enumerate(llm.model.lora_linears()):
        for name, linear in layer.items():
            assert linear.lora_a is not None and linear.lora_b is not None
            a, b = linear.lora_a[slot], linear.lora_b[slot]  # [in, R], [R, out]
            want_a, want_b = torch.zeros_like(a), torch.zeros_like(b)
            if (layer_index, name) in expected:
                lora_a, lora_b = expected[(layer_index, name)]
                want_a[:, : lora_a.shape[0]] = lora_a.t()
                want_b[: lora_b.shape[1]] = lora_b.t()
            assert torch.allclose(a, want_a) and torch.allclose(b, want_b), (slot, layer_index, name)


def test_a_slot_holds_exactly_its_adapter_after_refills(llm: LLM) -> None:
    storage = llm.engine.adapters.linear.lora
    all16, qv4 = loaded(llm, "all16"), loaded(llm, "qv4")
    storage.fill(0, all16.lora)
    storage.fill(1, qv4.lora)
    check_slot(llm, 0, all16)
    check_slot(llm, 1, qv4)
    storage.fill(0, qv4.lora)  # a rank-4, two-module adapter over a rank-16 all-linear one
    check_slot(llm, 0, qv4)
    check_slot(llm, 1, qv4)
    storage.fill(1, all16.lora)
    check_slot(llm, 1, all16)
    check_slot(llm, 0, qv4)
