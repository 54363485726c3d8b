"""What each benchmark mode measures: sizes, token counts and repeats, in one frozen dataclass per mode."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Settings:
    mode: str  # "cpu", "gpu" or "gpu-tiny"
    prompt_tokens: int
    new_tokens: int
    batch: int  # the base / one-adapter / soft-prompt cases
    distinct_batches: tuple[int, ...]  # N distinct LoRA adapters in a batch of N
    rank: int
    num_virtual_tokens: int  # soft prompts
    distinct_weights: int  # random weight sets on disk; more adapters are copies, each in its own slot
    num_zipf_adapters: int  # adapters in host memory for the Zipf workload
    num_zipf_slots: int  # device slots (max_gpu_adapters)
    num_zipf_requests: int
    zipf_prompt_tokens: int
    zipf_new_tokens: int  # mean; each request draws uniformly from [mean/2, 3*mean/2]
    zipf_s: float
    repeats: int  # each throughput case, adapterd and PEFT interleaved
    peft_mixed_new_tokens: int  # PEFT's mixed batch is slow on a GPU (26 tokens/s at B=64)
    num_samples: int  # cold loads, slot fills and TTFT
    seed: int = 0

    def __post_init__(self) -> None:
        assert self.num_zipf_slots >= max(self.distinct_batches), "every distinct adapter needs a slot"
        assert self.num_zipf_slots >= self.batch and self.batch % 2 == 0

    @property
    def max_batch(self) -> int:
        return max(self.batch, *self.distinct_batches)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


CPU = Settings(
    mode="cpu",
    prompt_tokens=128,
    new_tokens=32,
    batch=8,
    distinct_batches=(8,),
    rank=16,
    num_virtual_tokens=16,
    distinct_weights=8,
    num_zipf_adapters=64,
    num_zipf_slots=8,
    num_zipf_requests=32,
    zipf_prompt_tokens=32,
    zipf_new_tokens=16,
    zipf_s=1.0,
    repeats=2,
    peft_mixed_new_tokens=32,
    num_samples=5,
)

GPU = Settings(
    mode="gpu",
    prompt_tokens=128,
    new_tokens=64,
    batch=64,
    distinct_batches=(8, 32, 64),
    rank=16,
    num_virtual_tokens=16,
    distinct_weights=8,
    num_zipf_adapters=512,
    num_zipf_slots=64,
    num_zipf_requests=256,
    zipf_prompt_tokens=128,
    zipf_new_tokens=32,
    zipf_s=1.0,
    repeats=1,
    peft_mixed_new_tokens=8,
    num_samples=16,
)

GPU_TINY = replace(
    GPU,
    mode="gpu-tiny",
    prompt_tokens=32,
    new_tokens=16,
    batch=8,
    distinct_batches=(4, 8),
    distinct_weights=4,
    num_zipf_adapters=32,
    num_zipf_slots=8,
    num_zipf_requests=24,
    zipf_prompt_tokens=16,
    zipf_new_tokens=8,
    peft_mixed_new_tokens=8,
    num_samples=4,
)


def llama31_8b_config() -> Any:
    """Llama-3.1-8B's shapes (rope scaling left out: it changes no cost)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
        pad_token_id=128001,
    )


def tiny_config() -> Any:
    """A Llama small enough to run `--mode gpu --tiny` on a CPU in seconds."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=4096,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
