"""Reference decodings and seeded PEFT adapters that parity tests compare adapterd against.

LoRA: PEFT's `generate()` is the reference. Soft prompts: greedy decoding by full forward passes of the
PEFT model (see tests/parity/test_peft_reference.py for why its `generate()` is not).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

DEFAULT_LORA_SCALE = 0.2
PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def greedy_generate(
    model: Any, input_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None
) -> list[int]:
    """New tokens of `model.generate` (greedy); stops after `eos_token_id` if given, never early otherwise."""
    ids = torch.tensor([list(input_ids)])
    pad_token_id = eos_token_id if eos_token_id is not None else _pad_token_id(model)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    new_tokens = out[0, ids.shape[1] :].tolist()
    assert eos_token_id is not None or len(new_tokens) == max_new_tokens, "generate() stopped early"
    return new_tokens


def greedy_forward(
    model: Any, input_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None
) -> list[int]:
    """Greedy decoding by one full forward pass per token, without a KV cache, on the model's device."""
    ids = list(input_ids)
    new_tokens: list[int] = []
    with torch.no_grad():
        while len(new_tokens) < max_new_tokens:
            t = torch.tensor([ids], device=model.device)
            logits = model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False).logits
            token = int(logits[0, -1].argmax())
            new_tokens.append(token)
            ids.append(token)
            if token == eos_token_id:
                break
    return new_tokens


def peft_greedy(base: Path, adapter: Path | None, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """The reference greedy tokens: `generate()` of the base or the PEFT model, forward passes for a soft
    prompt (PEFT's prompt-tuning `generate()` is wrong on transformers 5.x)."""
    if adapter is None:
        return greedy_generate(load_base(base), prompt, new_tokens)
    model = load_peft(base, adapter)
    return (greedy_forward if is_prompt_learning(adapter) else greedy_generate)(model, prompt, new_tokens)


def is_prompt_learning(adapter: Path) -> bool:
    """Prompt tuning, P-tuning or prefix tuning: kinds whose reference is PEFT's forward pass."""
    peft_type = json.loads((adapter / "adapter_config.json").read_text())["peft_type"]
    return peft_type in PROMPT_LEARNING


def load_base(base_dir: Path, dtype: torch.dtype = torch.float32, quantization_config: Any = None) -> Any:
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=dtype, quantization_config=quantization_config
    )
    return model.eval()


def load_peft(
    base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32, quantization_config: Any = None
) -> PeftModel:
    """The base model with the saved adapter, as PEFT loads it for inference."""
    base = load_base(base_dir, dtype, quantization_config)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def make_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int,
    alpha: float,
    target_modules: str | list[str],
    use_rslora: bool = False,
    use_dora: bool = False,
    seed: int = 0,
    scale: float = DEFAULT_LORA_SCALE,
) -> Path:
    """Save a LoRA adapter with seeded random A and B. Each layer's update changes its output by `scale`
    (relative Frobenius norm) on calibration tokens, whatever r, alpha and rsLoRA are. With `use_dora`, a
    DoRA adapter whose magnitudes are also moved off their initial ||W|| (by ~`scale`, per output)."""
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=use_dora,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(load_base(base_dir), config)
    generator = torch.Generator().manual_seed(seed)
    for layer, x in _lora_layer_inputs(peft_model, generator).items():
        _randomise_lora(layer, x, generator, scale)
        if use_dora:
            magnitude = layer.lora_magnitude_vector["default"].weight
            with torch.no_grad():
                magnitude.mul_(1 + scale * torch.randn(magnitude.shape, generator=generator))
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_ia3_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    target_modules: list[str] | None = None,
    feedforward_modules: list[str] | None = None,
    seed: int = 0,
    scale: float = 0.3,
) -> Path:
    """Save an IA3 adapter (PEFT's default targets when None) whose vectors are 1 + `scale` * N(0, 1)."""
    config = IA3Config(
        task_type=TaskType.CAUSAL_LM, target_modules=target_modules, feedforward_modules=feedforward_modules
    )
    peft_model = get_peft_model(load_base(base_dir), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + scale * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_prefix_adapter(
    base_dir: Path, out_dir: Path, *, num_virtual_tokens: int, seed: int = 0, std: float = 1.0
) -> Path:
    """Save a prefix-tuning adapter with seeded N(0, std) keys and values."""
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens)
    peft_model = get_peft_model(load_base(base_dir), config)
    rows = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed)) * std)
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_p_tuning_adapter(base_dir: Path, out_dir: Path, *, num_virtual_tokens: int, seed: int = 0) -> Path:
    """Save a P-tuning adapter: PEFT's MLP prompt encoder (seeded) over seeded inputs; PEFT saves its output."""
    torch.manual_seed(seed)
    config = PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=32
    )
    peft_model = get_peft_model(load_base(base_dir), config)
    _randomise_prompt(peft_model, seed)
    peft_model.save_pretrained(out_dir)
    return out_dir


def _lora_layer_inputs(
    peft_model: PeftModel, generator: torch.Generator, num_tokens: int = 32
) -> dict[LoraLayer, torch.Tensor]:
    """Each LoRA layer's input on random calibration tokens (B is still zero: base activations)."""
    inputs: dict[LoraLayer, torch.Tensor] = {}

    def record(layer: LoraLayer, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        inputs[layer] = args[0][0].detach()

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    hooks = [layer.register_forward_hook(record) for layer in layers]
    ids = torch.randint(peft_model.config.vocab_size, (1, num_tokens), generator=generator)
    with torch.no_grad():
        peft_model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return {layer: inputs[layer] for layer in layers}


def _randomise_lora(layer: Any, x: torch.Tensor, generator: torch.Generator, scale: float) -> None:
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    with torch.no_grad():
        a_new = torch.randn(a.shape, generator=generator)
        b_new = torch.randn(b.shape, generator=generator)
        delta = layer.scaling["default"] * (x @ a_new.T) @ b_new.T
        base = layer.base_layer(x)
        factor = math.sqrt(scale * float(base.norm()) / float(delta.norm()))
        a.copy_(a_new * factor)
        b.copy_(b_new * factor)


def make_prompt_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    num_virtual_tokens: int,
    seed: int = 0,
    init_text: str | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Save a prompt-tuning adapter: PEFT's TEXT init from `init_text`, or seeded Gaussian rows with the
    per-element std of the model's token embeddings."""
    if init_text is None:
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
    else:
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=init_text,
            tokenizer_name_or_path=str(tokenizer_dir or base_dir),
        )
    peft_model = get_peft_model(load_base(base_dir), config)
    if init_text is None:
        _randomise_prompt(peft_model, seed)
    peft_model.save_pretrained(out_dir)
    return out_dir


def _randomise_prompt(peft_model: PeftModel, seed: int) -> None:
    rows = peft_model.prompt_encoder["default"].embedding.weight
    std = float(peft_model.get_input_embeddings().weight.std())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rows.copy_(torch.randn(rows.shape, generator=generator) * std)


def soft_prompt(peft_model: PeftModel) -> torch.Tensor:
    """The prompt-tuning adapter's virtual-token embeddings: [num_virtual_tokens, hidden]."""
    with torch.no_grad():
        return peft_model.get_prompt(batch_size=1)[0]


def _pad_token_id(model: Any) -> int:
    candidates = (model.config.pad_token_id, model.config.eos_token_id)
    return next((token_id for token_id in candidates if isinstance(token_id, int)), 0)


def next_token_logprobs(model: Any, input_ids: Sequence[int]) -> torch.Tensor:
    """log_softmax of the model's own forward pass over `input_ids`: row i is the distribution of the token
    after input_ids[i], [len(input_ids), vocab]. For prompt tuning this is PEFT's forward, which puts the
    virtual tokens in front (their rows are dropped: they are context, never scored)."""
    ids = torch.tensor([list(input_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return torch.log_softmax(logits[-len(input_ids) :], dim=-1)
