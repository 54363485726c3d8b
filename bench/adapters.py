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


def save_config(out_dir: Path, config: Any, state: dict[str, torch.Tensor]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(state, str(out_dir / WEIGHTS_FILE))
    return out_dir


def write_kind(
    out_dir: Path, kind: str, model_dir: Path, rank: int, num_virtual_tokens: int, seed: int
) -> Path:
    """A random adapter of `kind` (adapters/kinds) for the model in `model_dir`, as PEFT saves it: LoRA and
    DoRA of `rank` on all linears, IA³ on PEFT's default targets (k, v, down), prompt tuning, P-tuning and
    prefix tuning with `num_virtual_tokens`."""
    from peft import IA3Config, PrefixTuningConfig, PromptEncoderConfig
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    name, hidden = str(model_dir), config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    if kind in ("lora", "dora"):
        state = lora_state(config, rank, seed, torch.float32)
        peft_config = lora_config(rank, name)
        if kind == "dora":
            peft_config.use_dora = True
            for key, b in list(state.items()):
                if key.endswith("lora_B.weight"):
                    magnitude = 1 + 0.1 * torch.rand(b.shape[0], generator=generator)
                    state[key.removesuffix("lora_B.weight") + "lora_magnitude_vector"] = magnitude
        return save_config(out_dir, peft_config, state)
    if kind == "ia3":
        shapes = decoder_linear_shapes(config)
        state = {}
        for layer in range(config.num_hidden_layers):
            for module, block in (("k_proj", "self_attn"), ("v_proj", "self_attn"), ("down_proj", "mlp")):
                fan_in, fan_out = shapes[module]
                shape = (1, fan_in) if module == "down_proj" else (fan_out, 1)
                key = f"base_model.model.model.layers.{layer}.{block}.{module}.ia3_l"
                state[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        ia3 = IA3Config(
            task_type="CAUSAL_LM",
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            base_model_name_or_path=name,
        )
        return save_config(out_dir, ia3, state)
    if kind == "prompt_tuning":
        return save_prompt(out_dir, hidden, num_virtual_tokens, seed, name)
    if kind == "p_tuning":
        rows = torch.randn(num_virtual_tokens, hidden, generator=generator) * 0.02
        ptune = PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=num_virtual_tokens,
            token_dim=hidden,
            num_transformer_submodules=1,
            base_model_name_or_path=name,
        )
        return save_config(out_dir, ptune, {PROMPT_KEY: rows})
    assert kind == "prefix_tuning", kind
    kv_dim = decoder_linear_shapes(config)["k_proj"][1]
    width = config.num_hidden_layers * 2 * kv_dim
    prefix = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        token_dim=kv_dim,
        num_attention_heads=config.num_key_value_heads,
        num_layers=config.num_hidden_layers,
        num_transformer_submodules=1,
        base_model_name_or_path=name,
    )
    return save_config(
        out_dir, prefix, {PROMPT_KEY: torch.randn(num_virtual_tokens, width, generator=generator)}
    )
