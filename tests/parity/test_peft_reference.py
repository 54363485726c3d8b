"""The references parity tests trust: PEFT's `generate()` for LoRA, full forward passes for soft prompts."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache

from tests.reference import (
    greedy_forward,
    greedy_generate,
    load_base,
    load_peft,
    make_lora_adapter,
    make_prompt_adapter,
    soft_prompt,
)

NUM_VIRTUAL_TOKENS = 12
MAX_NEW_TOKENS = 32
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class SoftPromptCase:
    peft_model: Any
    tokenizer: Any
    prompt: list[int]
    reference: list[int]  # greedy_forward's tokens

    @property
    def base(self) -> Any:
        return self.peft_model.get_base_model()

    @property
    def soft(self) -> torch.Tensor:
        return soft_prompt(self.peft_model)


@pytest.fixture(scope="module")
def case(default_model: Any, tmp_path_factory: pytest.TempPathFactory) -> SoftPromptCase:
    adapter = make_prompt_adapter(
        default_model.path,
        tmp_path_factory.mktemp("soft-prompt"),
        num_virtual_tokens=NUM_VIRTUAL_TOKENS,
        init_text="Answer like a geography teacher.",
    )
    peft_model = load_peft(default_model.path, adapter)
    tokenizer = AutoTokenizer.from_pretrained(default_model.path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    reference = greedy_forward(peft_model, prompt, MAX_NEW_TOKENS)
    return SoftPromptCase(peft_model, tokenizer, prompt, reference)


def decode_by_full_forward(
    base: Any, soft: torch.Tensor, prompt: list[int], max_new_tokens: int
) -> list[int]:
    """How prompt tuning trains: rows [soft prompt; tokens] at positions 0..V+n-1, no cache."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        embeds = torch.cat([soft, _embed(base, ids)])[None]
        positions = torch.arange(embeds.shape[1])[None]
        with torch.no_grad():
            logits = base(inputs_embeds=embeds, position_ids=positions, use_cache=False).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def decode_with_cache(
    base: Any, soft: torch.Tensor, prompt: list[int], max_new_tokens: int, *, reinject: bool = False
) -> list[int]:
    """Prefill [soft prompt; prompt], then one token per step at the next position. With `reinject`, every
    step feeds [soft prompt; token] instead, as PEFT's generate() does under transformers 5.x."""
    cache = DynamicCache(config=base.config)
    logits = _cached_step(base, torch.cat([soft, _embed(base, prompt)]), cache)
    new_tokens = [int(logits.argmax())]
    while len(new_tokens) < max_new_tokens:
        embeds = _embed(base, new_tokens[-1:])
        logits = _cached_step(base, torch.cat([soft, embeds]) if reinject else embeds, cache)
        new_tokens.append(int(logits.argmax()))
    return new_tokens


def _cached_step(base: Any, embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    past = cache.get_seq_length()
    positions = torch.arange(past, past + embeds.shape[0])[None]
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = base(inputs_embeds=embeds[None], position_ids=positions, use_cache=True, **{cache_arg: cache})
    return out.logits[0, -1]


def _embed(base: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return base.get_input_embeddings()(torch.tensor(ids))


@pytest.mark.slow
def test_forward_decoding_is_how_the_soft_prompt_was_trained(case: SoftPromptCase) -> None:
    manual = decode_by_full_forward(case.base, case.soft, case.prompt, MAX_NEW_TOKENS)
    answer = case.tokenizer.decode(case.reference).split(case.tokenizer.eos_token)[0]

    assert manual == case.reference
    assert "Paris" in answer


@pytest.mark.slow
def test_forward_decoding_matches_a_correct_kv_cache(case: SoftPromptCase) -> None:
    assert decode_with_cache(case.base, case.soft, case.prompt, MAX_NEW_TOKENS) == case.reference


@pytest.mark.slow
def test_peft_generate_is_not_the_soft_prompt_reference(case: SoftPromptCase) -> None:
    """PEFT's generate() decodes soft prompts wrongly under transformers 5.x.

    Root cause: transformers 5.x renamed the cache kwarg `past_key_values` to `cache`
    (GenerationMixin.prepare_inputs_for_generation sets `model_inputs["cache"]`), but peft 0.21's
    PeftModelForCausalLM.prepare_inputs_for_generation still reads `model_kwargs.get("past_key_values")`.
    It finds None at every step, so `requires_prompt_injection` stays True after prefill and each decode
    step feeds [soft prompt; new token] (V+1 rows) instead of the token alone: decode step k attends to k
    extra copies of the soft prompt, its token at position V+n+k(V+1)-1 instead of V+n+k-1. Prompt tuning
    trains on [soft prompt; tokens] once, at positions 0..V+n-1 (PeftModelForCausalLM.forward): full
    forward passes and a correctly filled KV cache reproduce that; generate() does not.
    """
    generated, rows_fed = _generate_recording_rows(case)
    reinjected = decode_with_cache(case.base, case.soft, case.prompt, MAX_NEW_TOKENS, reinject=True)

    prefill = NUM_VIRTUAL_TOKENS + len(case.prompt)
    assert rows_fed == [prefill] + [NUM_VIRTUAL_TOKENS + 1] * (MAX_NEW_TOKENS - 1)
    assert generated == reinjected
    assert generated != case.reference, (
        "PEFT's prompt-tuning generate() now matches greedy full-forward decoding: PEFT (or transformers) "
        "stopped re-injecting the soft prompt at each step. Switch the soft-prompt reference to "
        "greedy_generate."
    )


def _generate_recording_rows(case: SoftPromptCase) -> tuple[list[int], list[int]]:
    """PEFT generate()'s tokens, and how many rows it feeds the base model at each forward."""
    rows: list[int] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        embeds = kwargs.get("inputs_embeds")
        rows.append(embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1])

    hook = case.base.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generated = greedy_generate(case.peft_model, case.prompt, MAX_NEW_TOKENS)
    finally:
        hook.remove()
    return generated, rows


@pytest.mark.parametrize("r", [4, 16, 64])
@pytest.mark.parametrize("target_modules", [ATTENTION, "all-linear"], ids=["attention", "all-linear"])
def test_lora_generate_matches_forward_decoding(
    tmp_path: Path, tiny_llama: Path, r: int, target_modules: str | list[str]
) -> None:
    adapter = make_lora_adapter(
        tiny_llama, tmp_path / "lora", r=r, alpha=2 * r, target_modules=target_modules
    )
    prompt = [1, 17, 42, 99, 5, 200, 33, 7]
    peft_model = load_peft(tiny_llama, adapter)
    generated = greedy_generate(peft_model, prompt, 24)

    assert generated == greedy_forward(peft_model, prompt, 24)
    base_tokens = greedy_generate(load_base(tiny_llama), prompt, 24)
    assert generated != base_tokens
    assert len(set(generated)) > 1
