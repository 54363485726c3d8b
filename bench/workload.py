"""The requests of each case: prompts, which adapter each row uses, and the Zipf workload."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    key: str  # JSON key
    title: str
    batch: int
    kind: str  # "base" | "one" | "distinct" | "soft" | "stream"


def cases(batch: int, distinct_batches: tuple[int, ...]) -> list[Case]:
    return [
        Case(f"base-{batch}", "base model alone", batch, "base"),
        Case(f"one-{batch}", "one LoRA for the whole batch", batch, "one"),
        *(Case(f"distinct-{n}", f"{n} distinct LoRA adapters", n, "distinct") for n in distinct_batches),
        Case(f"soft-{batch}", "distinct LoRA + soft prompts, half and half", batch, "soft"),
        Case("stream-1", "one stream (one LoRA)", 1, "stream"),
    ]


def random_prompts(num_rows: int, num_tokens: int, vocab_size: int, seed: int) -> torch.Tensor:
    """[num_rows, num_tokens] token ids, avoiding the low ids where special tokens usually sit."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(min(100, vocab_size // 2), vocab_size, (num_rows, num_tokens), generator=generator)


@dataclass(frozen=True)
class ZipfDraw:
    adapter_index: list[int]  # per request, into the registered adapters
    max_new_tokens: list[int]  # per request

    @property
    def num_distinct(self) -> int:
        return len(set(self.adapter_index))


def zipf_draw(num_requests: int, num_adapters: int, s: float, mean_new_tokens: int, seed: int) -> ZipfDraw:
    """Adapter k (0 = most popular) drawn with probability proportional to 1 / (k + 1)^s."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** s for k in range(num_adapters)]
    indices = rng.choices(range(num_adapters), weights=weights, k=num_requests)
    low, high = max(1, mean_new_tokens // 2), mean_new_tokens * 3 // 2
    return ZipfDraw(indices, [rng.randint(low, high) for _ in range(num_requests)])
