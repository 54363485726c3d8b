"""The dense weight of a base linear as the model computes with it: plain, oneDNN-packed, or dequantized
from NF4 / LLM.int8 (what PEFT's DoRA reads too, through the same bitsandbytes functions).

Found while testing DoRA on NF4: on CPUs with AVX512-BF16, bitsandbytes repacks a `Linear4bit`'s weight
into a kernel layout on its first forward (`quant_state.packing_format_for_cpu`), after which
`dequantize_4bit` of that data is garbage (off by more than the weights' own size). PEFT's DoRA reads the
weight after the base layer's forward, so on such CPUs its NF4 DoRA norms are wrong; here a packed weight is
unpacked first, on copies (the module keeps its packed layout). tests/parity/test_adapter_kinds.py holds
the check."""

from __future__ import annotations

import copy

import torch
from torch import nn


def dense_weight(module: nn.Module) -> torch.Tensor:
    """`module`'s weight as [out, in] float32 on its device."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes as bnb

        data = weight.data
        if getattr(quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, quant_state = _convert_weight_packed_for_cpu_inverse(
                data.clone(), copy.deepcopy(quant_state)
            )
        return bnb.functional.dequantize_4bit(data, quant_state).float()
    scales = getattr(weight, "SCB", None)
    if scales is not None and weight.dtype == torch.int8:  # bitsandbytes Int8Params
        import bitsandbytes as bnb

        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    return weight.detach().to(torch.float32)
