"""Build a `LlamaModel` from a Hugging Face directory, with its linears plain, NF4 or int8.

Quantization follows QLoRA (Dettmers et al. 2023): NF4 with double quantization of the absmax constants,
via bitsandbytes; int8 is bitsandbytes' LLM.int8. The base weights exist once; LoRA never touches them.
Conversion (checkpoint -> quantized module) happens here only; the model code sees `forward(x)` modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import nn

from adapterd.adapters.format import decoder_linear_shapes
from adapterd.server.model.llama import LINEAR_MODULES, LlamaModel
from adapterd.server.model.lora import LoRALinear
from adapterd.server.model.packed_linear import cpu_linear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
RealQuantize = str  # "nf4" | "int8" | "none"


@dataclass(frozen=True)
class Placement:
    """Where and how the base model runs, once `auto` is resolved."""

    device: torch.device
    quantize: RealQuantize
    dtype: torch.dtype  # activations, unquantized weights, KV cache and adapters
    nf4_kernel: str = "bitsandbytes"  # or "triton": NF4 products of >= 2 rows through triton_nf4

    @classmethod
    def resolve(cls, device: str, quantize: str, nf4_kernel: str = "bitsandbytes") -> Placement:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")
        if quantize == "auto":
            quantize = "nf4" if device == "cuda" else "none"
        if quantize not in ("nf4", "int8", "none"):
            raise ValueError(f"--quantize must be auto, nf4, int8 or none, not {quantize!r}")
        if nf4_kernel == "triton" and quantize == "nf4":
            _check_fused_nf4(device)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        return cls(torch.device(device), quantize, dtype, nf4_kernel)


def _check_fused_nf4(device: str) -> None:
    from adapterd.server.model.triton_lora import interpreted, triton_available

    if not triton_available():
        raise ValueError("ADAPTERD_NF4_KERNEL=triton needs Triton installed (pip install triton)")
    if device != "cuda" and not interpreted():
        raise ValueError(
            "ADAPTERD_NF4_KERNEL=triton needs a CUDA device (or Triton's interpreter, for tests)"
        )


def load_config(path: Path) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {config.model_type!r} is not supported; adapterd serves {SUPPORTED_MODEL_TYPES}"
        )
    return config


def load_model(path: Path, placement: Placement) -> LlamaModel:
    config = load_config(path)
    weights = _read_safetensors(path)
    layers = [_layer_linears(config, weights, i, placement) for i in range(config.num_hidden_layers)]
    with torch.device("meta"):
        model = LlamaModel(config, layers)
    _load_dense(model, weights, config, placement)
    return model.eval()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    files = files or ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(path / name))
    return weights


def _layer_linears(
    config: Any, weights: dict[str, torch.Tensor], layer: int, placement: Placement
) -> dict[str, LoRALinear]:
    linears = {}
    for name, (fan_in, fan_out) in decoder_linear_shapes(config).items():
        block = "self_attn" if name in LINEAR_MODULES[:4] else "mlp"
        prefix = f"model.layers.{layer}.{block}.{name}"
        weight = weights.pop(f"{prefix}.weight")
        bias = weights.pop(f"{prefix}.bias", None)
        assert weight.shape == (fan_out, fan_in), f"{prefix}: {tuple(weight.shape)} != {(fan_out, fan_in)}"
        linears[name] = LoRALinear(make_base_linear(weight, bias, placement), fan_in, fan_out)
    return linears


def make_base_linear(weight: torch.Tensor, bias: torch.Tensor | None, placement: Placement) -> nn.Module:
    """A frozen linear layer holding `weight` [out, in] as the placement asks (quantized on the way; on the CPU
    in fp32, packed for oneDNN)."""
    fan_out, fan_in = weight.shape
    weight = weight.to(placement.dtype)
    if placement.quantize == "none":
        linear = nn.Linear(fan_in, fan_out, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.to(placement.dtype), requires_grad=False)
        linear = linear.to(placement.device)
        return cpu_linear(linear.weight, linear.bias) or linear
    import bitsandbytes as bnb

    module: nn.Module
    if placement.quantize == "nf4":
        linear4bit = bnb.nn.Linear4bit
        if placement.nf4_kernel == "triton":
            from adapterd.server.model.nf4_linear import FusedLinear4bit as linear4bit
        module = linear4bit(
            fan_in,
            fan_out,
            bias=bias is not None,
            compute_dtype=placement.dtype,
            quant_type="nf4",
            compress_statistics=True,
            device="meta",
        )
        module.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", compress_statistics=True
        )
    else:
        module = bnb.nn.Linear8bitLt(
            fan_in, fan_out, bias=bias is not None, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(placement.dtype), requires_grad=False)
    module = module.to(placement.device)  # bitsandbytes quantizes when the weight is placed
    prepare_fused = getattr(module, "prepare_fused", None)  # FusedLinear4bit: the kernel's operands, once
    if prepare_fused is not None:
        prepare_fused()
    return module


def _load_dense(
    model: LlamaModel, weights: dict[str, torch.Tensor], config: Any, placement: Placement
) -> None:
    """Embeddings, norms and the LM head stay in the placement dtype (never quantized, as in QLoRA)."""
    state = {name.removeprefix("model."): tensor for name, tensor in weights.items()}
    if "lm_head.weight" not in state or getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["embed_tokens.weight"]
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    dense = {name for name, _ in model.named_parameters() if ".base." not in name}
    missing, unexpected = dense - state.keys(), state.keys() - dense
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for name in dense:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(
            module,
            attr,
            nn.Parameter(state[name].to(placement.dtype).to(placement.device), requires_grad=False),
        )
    model.rotary_emb = type(model.rotary_emb)(config=config).to(placement.device)
    # The head gets oneDNN's own copy of its weight (a tied embedding keeps the original for lookups).
    model.lm_head = cpu_linear(cast(torch.Tensor, model.lm_head.weight), None) or model.lm_head
