"""Random PEFT adapters written as PEFT saves them: LoRA on all seven linear modules, and soft prompts.

Weights are random and non-zero (B is not zero, as it would be fresh from `get_peft_model`), so every
LoRA layer does its full work. The state dicts use PEFT's saved key names, so the same tensors can be
written to a directory for adapterd or loaded into a `PeftModel` with `set_peft_model_state_dict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PromptTuningConfig, TaskType
from safetensors.torch import save_file

from adapterd.adapters.format import PROMPT_KEY, WEIGHTS_FILE, decoder_linear_shapes
from adapterd.server.model.llama import LINEAR_MODULES


def lora_config(rank: int, base_name: str) -> LoraConfig:
    """Rank `rank` on all linear modules of a Llama decoder, alpha = 2 * rank (scale 2)."""
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(LINEAR_MODULES),
        lora_dropout=0.0,
        base_model_name_or_path=base_name,
    )


def lora_state(config: Any, rank: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA tensors for every decoder layer: A [r, in], B [out, r], on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for layer in range(config.num_hidden_layers):
        for name, (fan_in, fan_out) in decoder_linear_shapes(config).items():
            block = "self_attn" if name in LINEAR_MODULES[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            a = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            b = torch.randn(fan_out, rank, generator=generator) * 0.01
            state[f"{prefix}.lora_A.weight"] = a.to(dtype)
            state[f"{prefix}.lora_B.weight"] = b.to(dtype)
    return state


def save_lora(out_dir: Path, state: dict[str, torch.Tensor], rank: int, base_name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_config(rank, base_name).save_pretrained(str(out_dir))
    save_file(state, str(out_dir / WEIGHTS_FILE))
    return out_dir


def write_loras(root: Path, model_dir: Path, count: int, rank: int) -> list[Path]:
    """`count` random fp32 LoRAs of `rank` for the model in `model_dir`, saved as root/lora0, root/lora1, ..."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return [
        save_lora(
            root / f"lora{i}", lora_state(config, rank, seed=i, dtype=torch.float32), rank, str(model_dir)
        )
        for i in range(count)
    ]


def save_prompt(out_dir: Path, hidden_size: int, num_virtual_tokens: int, seed: int, base_name: str) -> Path:
    """A prompt-tuning adapter with Gaussian rows (std 0.02, like a token embedding)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens,
        token_dim=hidden_size,
        num_transformer_submodules=1,
        base_model_name_or_path=base_name,
    )
    config.save_pretrained(str(out_dir))
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_virtual_tokens, hidden_size, generator=generator) * 0.02
    save_file({PROMPT_KEY: rows}, str(out_dir / WEIGHTS_FILE))
    return out_dir
