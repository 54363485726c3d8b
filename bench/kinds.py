"""python -m bench.kinds: what the adapter kinds cost as users meet them, through `adapterd serve`.

`adapterd serve` (default model), 8 concurrent greedy chat streams (48 new tokens, ignore_eos) in turns, for
--rounds rounds (the order of the cases turning from round to round):
  lora   8 distinct rank-16 LoRAs on all linears
  mixed  all six kinds in one batch of 8: 2 LoRAs and 2 DoRAs (rank 16), an IA³, a soft prompt, a
         P-tuning prompt and a prefix-tuning prefix (16 virtual tokens each)
  dora   8 distinct rank-16 DoRAs on all linears
Prints each case's decode throughput (tokens per second after each stream's first token, summed) and the
ratios the issue sets: mixed / lora (target >= 0.8) and the cost of a DoRA row against a LoRA row of the
same rank, lora / dora (target <= 1.1). Writes bench/results-kinds.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from .http_serving import start_server, summary, upload
from .structured import batch, decode_rate

RANK = 16
VIRTUAL_TOKENS = 16
CASES = {
    "lora": ["lora"] * 8,
    "mixed": ["lora", "dora", "ia3", "prompt_tuning", "lora", "p_tuning", "prefix_tuning", "dora"],
    "dora": ["dora"] * 8,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kinds", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results-kinds.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from adapterd.server.common.config import default_cache_dir
    from adapterd.server.model.resolve import resolve_model

    from .adapters import write_kind

    model_dir = resolve_model("default", default_cache_dir()).path
    results: dict[str, Any] = {"rank": RANK, "virtual_tokens": VIRTUAL_TOKENS, "rounds": {}}
    with tempfile.TemporaryDirectory(prefix="bench-kinds-") as tmp:
        root = Path(tmp)
        ids: dict[str, list[str]] = {}
        paths = {}
        for case, kinds in CASES.items():
            ids[case] = []
            for i, kind in enumerate(kinds):
                adapter_id = f"{case}-{i}-{kind.replace('_', '-')}"
                paths[adapter_id] = write_kind(
                    root / adapter_id, kind, model_dir, RANK, VIRTUAL_TOKENS, seed=i
                )
                ids[case].append(adapter_id)
        # Every adapter of a round stays in its device slots: 8 of the linear kinds per case, 3 prompts.
        extra = ["--max-gpu-adapters", "24", "--max-rank", str(RANK)]
        process, url = start_server(root / "store", root / "server.log", extra)
        try:
            for adapter_id, path in paths.items():
                upload(url, adapter_id, path)
            for case in CASES:  # warm-up: every adapter placed, DoRA's norms computed
                asyncio.run(batch(url, ids[case], constrained=False))
            order = list(CASES)
            for round_index in range(args.rounds):  # the cases' order turns each round: no case always last
                for case in order[round_index % 3 :] + order[: round_index % 3]:
                    done = asyncio.run(batch(url, ids[case], constrained=False))
                    row = {**summary(done), "decode_tokens_per_s": decode_rate(done)}
                    results["rounds"].setdefault(case, []).append(row)
        finally:
            process.terminate()
            process.wait(timeout=60)
    print_report(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def print_report(results: dict[str, Any]) -> None:
    rates = {case: [r["decode_tokens_per_s"] for r in rounds] for case, rounds in results["rounds"].items()}
    for case, values in rates.items():
        print(f"{case:6s} decode tok/s per round: {', '.join(f'{v:.1f}' for v in values)}")
    mixed = [m / lora for m, lora in zip(rates["mixed"], rates["lora"], strict=True)]
    dora_cost = [lora / d for lora, d in zip(rates["lora"], rates["dora"], strict=True)]
    print(
        f"mixed / lora throughput per round: {', '.join(f'{r:.3f}' for r in mixed)}; median {statistics.median(mixed):.3f} (target >= 0.8)"
    )
    print(
        f"DoRA row cost / LoRA row cost per round: {', '.join(f'{r:.3f}' for r in dora_cost)}; median {statistics.median(dora_cost):.3f} (target <= 1.1)"
    )
    results["mixed_over_lora"] = mixed
    results["dora_cost_over_lora"] = dora_cost


if __name__ == "__main__":
    main()
