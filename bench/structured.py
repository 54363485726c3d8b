"""python -m bench.structured: what structured output costs, in the grammar engine and as users meet it.

  engines   llguidance (what adapterd uses) and xgrammar (when installed: pip install -e '.[bench]') on the
            default model's tokenizer: cold compile time of typical JSON schemas, and a constrained row's
            mask per decode step (fill, then apply to its [vocab] logits) over a 64-token walk
  served    `adapterd serve` (default model, 8 rank-16 LoRAs), 8 concurrent greedy streams on 8 distinct
            LoRAs: unconstrained, and with half the rows constrained to a JSON schema (in turns, --rounds
            times); the decode throughput of each and their ratio
  arrivals  6 streams decoding while 6 requests arrive, each with a schema the server has never seen (its
            grammar is compiled on arrival), against 6 arriving unconstrained: the streams' inter-token
            latency, which a compile on the engine thread would stretch

Writes bench/results-structured.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from .http_serving import (
    FRESH_CONNECTIONS,
    NUM_ADAPTERS,
    QUESTIONS,
    RANK,
    Request,
    chat,
    percentiles,
    start_server,
    summary,
    upload,
    user,
)

NEW_TOKENS = 48
S = {"type": "string", "maxLength": 24}
TYPICAL = [
    {
        "type": "object",
        "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 150}, "email": S},
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
            "status": {"enum": ["pending", "shipped", "delivered", "returned"]},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": S,
                        "quantity": {"type": "integer", "minimum": 1},
                        "price": {"type": "number"},
                    },
                    "required": ["sku", "quantity"],
                },
                "maxItems": 20,
            },
        },
        "required": ["order_id", "status", "items"],
    },
    {
        "$defs": {
            "address": {
                "type": "object",
                "properties": {"street": S, "city": S, "zip": S},
                "required": ["city"],
            }
        },
        "type": "object",
        "properties": {
            "home": {"$ref": "#/$defs/address"},
            "work": {"$ref": "#/$defs/address"},
            "since": {"type": "string", "format": "date"},
        },
        "required": ["home"],
    },
    {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "neutral", "negative"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "topics": {"type": "array", "items": S, "maxItems": 5},
        },
        "required": ["sentiment", "confidence"],
    },
]
# Constrained rows of the served case: a schema no row can finish within NEW_TOKENS, so every row decodes
# to the end (the batch stays 8 wide) and the comparison is of steps alike.
LONG = {
    "type": "object",
    "properties": {
        "title": S,
        "steps": {"type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 40},
    },
    "required": ["title", "steps"],
}


# -- the grammar engines -------------------------------------------------------------------------------------


def measure_engines(tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> dict[str, Any]:
    results = {"llguidance": measure_llguidance(tokenizer, vocab_size, eos_ids)}
    try:
        results["xgrammar"] = measure_xgrammar(tokenizer, vocab_size)
    except ImportError:
        print("xgrammar is not installed (pip install -e '.[bench]'): measuring llguidance only")
    return results


def measure_llguidance(tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> dict[str, Any]:
    from adapterd.server.common.protocol import constraint
    from adapterd.server.engine.grammar import Grammars, allowed_tokens

    grammars = Grammars(tokenizer, vocab_size, eos_ids)
    started = time.perf_counter()
    grammars.matcher(constraint("json_object", None, "warm-up"))  # builds llguidance's tokenizer
    setup = time.perf_counter() - started
    compiles, masks = [], []
    for schema in TYPICAL:
        started = time.perf_counter()
        matcher = grammars.matcher(constraint("json_schema", schema, "bench"))
        compiles.append(time.perf_counter() - started)
        finished = lambda m=matcher: m.is_finished  # noqa: E731
        masks.extend(
            walk(lambda m=matcher: allowed_tokens([m], vocab_size)[0], matcher.accept, finished, vocab_size)
        )
    return _engine_summary(setup, compiles, masks)


def measure_xgrammar(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    import xgrammar

    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    setup = time.perf_counter() - started
    compiles, masks = [], []
    bits = torch.tensor([1 << bit for bit in range(32)], dtype=torch.int64).to(torch.int32)
    for schema in TYPICAL:
        started = time.perf_counter()
        matcher = xgrammar.GrammarMatcher(
            compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        )
        compiles.append(time.perf_counter() - started)
        bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

        def allowed(matcher: Any = matcher, bitmask: torch.Tensor = bitmask) -> torch.Tensor:
            matcher.fill_next_token_bitmask(bitmask, 0)
            return ((bitmask[0].unsqueeze(-1) & bits) != 0).view(-1)[:vocab_size]

        masks.extend(walk(allowed, matcher.accept_token, matcher.is_terminated, vocab_size))
    return _engine_summary(setup, compiles, masks)


def walk(allowed: Any, accept: Any, finished: Any, vocab_size: int, steps: int = 64) -> list[float]:
    """Seconds per step to fill a row's mask and apply it to random logits, along a greedy walk."""
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        logits = torch.randn(vocab_size, generator=generator)
        started = time.perf_counter()
        mask = allowed()
        masked = logits.masked_fill(~mask, float("-inf"))
        times.append(time.perf_counter() - started)
        accept(int(masked.argmax()))
        if finished():
            break
    return times


def _engine_summary(setup: float, compiles: list[float], masks: list[float]) -> dict[str, Any]:
    return {
        "tokenizer_setup_s": setup,
        "compile_ms": {"mean": 1e3 * statistics.fmean(compiles), "max": 1e3 * max(compiles)},
        "mask_ms_per_row_step": {k: 1e3 * v for k, v in percentiles(masks).items()},
    }


# -- through the server ----------------------------------------------------------------------------------------


async def batch(url: str, models: list[str], constrained: bool) -> list[Request]:
    """8 streams, one per model; with `constrained`, rows 0, 2, 4, 6 are held to the LONG schema."""
    schema = {"type": "json_schema", "json_schema": {"name": "plan", "schema": LONG}}
    async with httpx.AsyncClient(timeout=600, limits=FRESH_CONNECTIONS) as client:
        calls = [
            chat(
                client,
                url,
                model,
                user(QUESTIONS[i % len(QUESTIONS)]),
                NEW_TOKENS,
                {"response_format": schema} if constrained and i % 2 == 0 else None,
            )
            for i, model in enumerate(models)
        ]
        return list(await asyncio.gather(*calls))


def decode_rate(requests: list[Request]) -> float:
    """Tokens per second after each stream's first token, summed over the streams."""
    return sum((len(r.token_times) - 1) / (r.token_times[-1] - r.token_times[0]) for r in requests)


async def arrivals(url: str, models: list[str], fresh_schemas: bool, salt: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600, limits=FRESH_CONNECTIONS) as client:
        streams = [
            asyncio.create_task(chat(client, url, m, user(QUESTIONS[i]), 64))
            for i, m in enumerate(models[:6])
        ]
        await asyncio.sleep(1.5)
        arriving = []
        for i in range(6):
            schema = {**TYPICAL[i % len(TYPICAL)], "title": f"fresh-{salt}-{i}"}  # never seen: compiled now
            extra = {
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            }
            arriving.append(
                asyncio.create_task(
                    chat(client, url, models[6], user(QUESTIONS[i]), 8, extra if fresh_schemas else None)
                )
            )
            await asyncio.sleep(0.2)
        done = list(await asyncio.gather(*streams))
        arrived = list(await asyncio.gather(*arriving))
    return {
        "stream_itl_s": percentiles([t for r in done for t in r.itls]),
        "arrival_ttft_s": percentiles([r.ttft for r in arrived]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default="engines,served,arrivals")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results-structured.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoConfig, AutoTokenizer

    from adapterd.server.common.config import default_cache_dir
    from adapterd.server.model.resolve import resolve_model

    from .adapters import write_loras

    model_dir = resolve_model("default", default_cache_dir()).path
    cases = set(args.cases.split(","))
    results: dict[str, Any] = {"new_tokens": NEW_TOKENS}
    if "engines" in cases:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
        results["engines"] = measure_engines(tokenizer, vocab_size, {tokenizer.eos_token_id})
    if cases & {"served", "arrivals"}:
        with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
            root = Path(tmp)
            paths = write_loras(root / "adapters", model_dir, NUM_ADAPTERS, RANK)
            ids = [p.name for p in paths]
            process, url = start_server(root / "store", root / "server.log", [])
            try:
                for adapter_id, path in zip(ids, paths, strict=True):
                    upload(url, adapter_id, path)
                asyncio.run(batch(url, ids, constrained=True))  # warm-up, and LONG's grammar compiled
                if "served" in cases:
                    for _ in range(args.rounds):
                        for constrained in (False, True):
                            done = asyncio.run(batch(url, ids, constrained))
                            round_ = {**summary(done), "decode_tokens_per_s": decode_rate(done)}
                            results.setdefault("constrained" if constrained else "unconstrained", []).append(
                                round_
                            )
                if "arrivals" in cases:
                    for salt in range(args.rounds):
                        for fresh in (False, True):
                            key = "arrivals_fresh_schemas" if fresh else "arrivals_unconstrained"
                            results.setdefault(key, []).append(asyncio.run(arrivals(url, ids, fresh, salt)))
            finally:
                process.terminate()
                process.wait(timeout=60)
    print_report(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def print_report(results: dict[str, Any]) -> None:
    for name, engine in results.get("engines", {}).items():
        mask = engine["mask_ms_per_row_step"]
        print(
            f"{name:>10}: tokenizer setup {engine['tokenizer_setup_s']:.2f} s; compile mean "
            f"{engine['compile_ms']['mean']:.1f} ms (max {engine['compile_ms']['max']:.1f}); mask per row "
            f"and step p50 {mask['p50']:.2f} ms, p99 {mask['p99']:.2f} ms"
        )
    if "constrained" in results:
        free = [r["decode_tokens_per_s"] for r in results["unconstrained"]]
        held = [r["decode_tokens_per_s"] for r in results["constrained"]]
        ratios = [h / f for h, f in zip(held, free, strict=True)]
        print(
            f"decode tokens/s, 8 LoRAs x 8 streams: unconstrained {_span(free)}, half constrained {_span(held)}"
        )
        print(f"  ratio per round (constrained / unconstrained): {', '.join(f'{r:.3f}' for r in ratios)}")
        print(f"  median ratio {statistics.median(ratios):.3f}; over all rounds {sum(held) / sum(free):.3f}")
    if "arrivals_fresh_schemas" in results:
        for key in ("arrivals_unconstrained", "arrivals_fresh_schemas"):
            itl = [r["stream_itl_s"] for r in results[key]]
            ttft = [r["arrival_ttft_s"]["p50"] for r in results[key]]
            print(
                f"{key}: running streams' ITL p50 {_span([i['p50'] * 1e3 for i in itl])} ms, p99 "
                f"{_span([i['p99'] * 1e3 for i in itl])} ms; arrivals' TTFT p50 {_span([t * 1e3 for t in ttft])} ms"
            )


def _span(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


if __name__ == "__main__":
    main()
