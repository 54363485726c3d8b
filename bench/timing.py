"""One timed generation of a batch, the same shape for adapterd and for transformers + PEFT.

Decode throughput is steady-state: tokens generated after every row has its first token, divided by the
time from that moment to the last token. Prefill (all rows' first tokens) is reported on its own, and
end-to-end throughput counts every generated token over the whole call. The same decode tokens are also
divided by the process's CPU time over the same span: on a machine shared with other work that figure moves
far less than wall time does (it still counts OpenMP threads spinning, so compare it at --threads 1).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Run:
    batch: int
    num_tokens: int  # generated, all rows together
    prefill_s: float  # submit -> every row has its first token
    decode_s: float  # -> every row has its last token
    total_s: float  # submit -> the call returned
    decode_cpu_s: float  # process CPU time over the decode span

    @property
    def decode_tok_s(self) -> float:
        return (self.num_tokens - self.batch) / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def decode_tok_per_cpu_s(self) -> float:
        return (self.num_tokens - self.batch) / self.decode_cpu_s if self.decode_cpu_s > 0 else float("nan")

    @property
    def e2e_tok_s(self) -> float:
        return self.num_tokens / self.total_s

    def as_dict(self) -> dict[str, float]:
        return {
            "batch": self.batch,
            "num_tokens": self.num_tokens,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "total_s": self.total_s,
            "decode_cpu_s": self.decode_cpu_s,
            "decode_tok_s": self.decode_tok_s,
            "decode_tok_per_cpu_s": self.decode_tok_per_cpu_s,
            "e2e_tok_s": self.e2e_tok_s,
        }


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> Spread:
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))

    def as_dict(self) -> dict[str, object]:
        return {"median": self.median, "min": self.low, "max": self.high, "samples": list(self.samples)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
