"""The base model, twice: adapterd's `LlamaModel` and the transformers model PEFT wraps.

CPU mode loads the default model (SmolLM2-135M-Instruct) from its converted directory, once per side, in
fp32. GPU mode builds a model from a config with random weights and no checkpoint on disk: transformers
initialises it in the placement dtype, adapterd's loader quantizes each linear to NF4 on the way in, and
the transformers model is then given those very quantized modules, so both sides run the same NF4 bytes
through the same bitsandbytes kernels and only the serving code differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterd.server.common.config import default_cache_dir
from adapterd.server.model import loader
from adapterd.server.model.llama import LINEAR_MODULES, LlamaModel
from adapterd.server.model.loader import Placement
from adapterd.server.model.resolve import resolve_model


@dataclass
class Models:
    name: str
    path: Path | None  # the model directory (tokenizer, eos); None for random weights
    config: Any  # the transformers config
    placement: Placement
    engine_model: LlamaModel
    hf_model: nn.Module

    @property
    def device(self) -> torch.device:
        return self.placement.device


def load_default() -> Models:
    """SmolLM2-135M-Instruct in fp32 on the CPU, as `adapterd serve` runs it there."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model("default", default_cache_dir())
    placement = Placement.resolve("cpu", "none")
    engine_model = loader.load_model(resolved.path, placement)
    hf_model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=placement.dtype).eval()
    return Models(resolved.name, resolved.path, engine_model.config, placement, engine_model, hf_model)


def build_random(config: Any, name: str, placement: Placement, seed: int) -> Models:
    """Random weights of `config`'s shapes; adapterd's linears quantized as the placement asks."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(placement.device), default_dtype(placement.dtype):
        hf_model = LlamaForCausalLM(config).eval()
    engine_model = build_engine_model(config, dict(hf_model.state_dict()), placement)
    for index, layer in enumerate(hf_model.model.layers):
        engine_layer = engine_model.layers[index]
        for module in LINEAR_MODULES:
            block, engine_block = (
                (layer.self_attn, engine_layer.self_attn)
                if module in LINEAR_MODULES[:4]
                else (layer.mlp, engine_layer.mlp)
            )
            setattr(block, module, getattr(engine_block, module).base)  # the same quantized module
    if placement.quantize == "nf4":
        hf_model.is_loaded_in_4bit = True  # PEFT then wraps the linears with its bitsandbytes LoRA layer
    return Models(name, None, config, placement, engine_model, hf_model)


def build_engine_model(config: Any, weights: dict[str, torch.Tensor], placement: Placement) -> LlamaModel:
    """`loader.load_model` without the checkpoint: the same steps on a state dict already in memory.

    The loader has no public entry point for this (see docs/performance.md): these are its private steps.
    """
    layers = [
        loader._layer_linears(config, weights, i, placement)  # pops (and quantizes) each linear
        for i in range(config.num_hidden_layers)
    ]
    with torch.device("meta"):
        model = LlamaModel(config, layers)
    loader._load_dense(model, weights, config, placement)
    return model.eval()


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
