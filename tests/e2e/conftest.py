"""One server the compatibility tests share (real clients, log-probabilities, tokenizer routes): a tiny random
model with the default model's tokenizer and chat template, and PEFT-made LoRA and soft-prompt adapters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from adapterd.server.model.resolve import ResolvedModel
from tests.e2e.serving import Server, make_tiny_chat_model, serving_adapters
from tests.reference import load_base, load_peft, make_lora_adapter, make_prompt_adapter

COMPAT_ADAPTERS = ("lora", "soft")
NUM_VIRTUAL = 4


@pytest.fixture(scope="session")
def compat_model(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("compat-model"), default_model.path, seed=3)


@pytest.fixture(scope="session")
def compat_tokenizer(compat_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(compat_model)


@pytest.fixture(scope="session")
def compat_adapters(compat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compat-adapters")
    return {
        "lora": make_lora_adapter(compat_model, root / "lora", r=8, alpha=16, target_modules="all-linear"),
        "soft": make_prompt_adapter(compat_model, root / "soft", num_virtual_tokens=NUM_VIRTUAL, seed=2),
    }


@pytest.fixture(scope="session")
def compat_peft(compat_model: Path, compat_adapters: dict[str, Path]) -> dict[str, Any]:
    """The reference models by adapter id ("" is the base): transformers + PEFT, fp32."""
    return {
        "": load_base(compat_model),
        **{a: load_peft(compat_model, p) for a, p in compat_adapters.items()},
    }


@pytest.fixture(scope="session")
def compat_server(
    compat_model: Path, compat_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("compat-server")
    with serving_adapters(compat_model, compat_adapters, root, "--kv-cache-tokens", "8192") as server:
        yield server
