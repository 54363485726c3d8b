"""The other Llama-family architectures: Qwen2 (q/k/v biases), Mistral, and Llama 3's rope scaling.
Greedy tokens equal transformers' (and PEFT's, with a LoRA) on tiny random models of each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import GenerateRequest, SamplingParams
from adapterd.server.llm import LLM
from adapterd.server.model.resolve import ModelNotFound, resolve_model
from tests.reference import greedy_generate, load_base, load_peft, make_lora_adapter

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def save_random(kind: str, path: Path) -> Path:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    builders = {
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None)),
        "llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters=LLAMA3_ROPE)),
    }
    torch.manual_seed(1)
    model = builders[kind]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2 if p.dim() == 2 else 0.5) if "norm" not in name else None
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "llama3-rope"])
def test_family_equals_transformers_and_peft(kind: str, tmp_path: Path):
    base = save_random(kind, tmp_path / kind)
    if kind == "qwen2":  # the biases must be real, or the test proves nothing about them
        assert load_base(base).model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    lora = make_lora_adapter(base, tmp_path / "lora", r=8, alpha=16, target_modules="all-linear")
    prompt = list(range(3, 100, 7))  # positions past 64 exercise llama3's scaled frequencies
    llm = LLM(
        model=str(base), quantize="none", device="cpu", engine=EngineConfig(max_rank=8, kv_cache_tokens=1024)
    )
    try:
        llm.add_adapter("lora", lora)
        params = SamplingParams(max_new_tokens=48, ignore_eos=True)
        outs = llm.generate(
            [GenerateRequest(prompt_ids=tuple(prompt), adapter_id=a, params=params) for a in (None, "lora")]
        )
    finally:
        llm.close()
    assert list(outs[0].token_ids) == greedy_generate(load_base(base), prompt, 48)
    assert list(outs[1].token_ids) == greedy_generate(load_peft(base, lora), prompt, 48)


def test_model_argument_errors_are_clear(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match=r"no config\.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path / "cache")
    with pytest.raises(ModelNotFound, match="neither a model directory"):
        resolve_model(str(tmp_path / "missing"), tmp_path / "cache")
    with pytest.raises(ModelNotFound, match="neither a model directory"):
        resolve_model("not/a/hub/id", tmp_path / "cache")


def test_unsupported_architecture_is_refused(tmp_path: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        LLM(model=str(tmp_path / "gpt2"), quantize="none", device="cpu")
