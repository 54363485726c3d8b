"""Where one adapterd decode step's time goes: python -m bench.profile [--kind distinct] [--batch 8].

Drives the engine by hand (its thread stopped) on the default model with a decode batch, then reports
1. the step's phases (schedule, build the batch, forward, sample, postprocess),
2. the forward split by module, from forward hooks (base linears, the LoRA delta, attention without its
   linears, MLP without its linears, norms, LM head, the rest),
3. the top aten ops (torch.profiler, self CPU time),
4. the LoRA op alone per call on layer 0's shapes: the base linear, the gather (`bgmv_reference`), the
   CPU decode ops (`bgmv_embedding_bag`, the C++ kernel the engine uses when it builds), the whole layer.
Writes JSON to --out (default bench/profile-<kind>.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import SamplingParams
from adapterd.server.engine.engine import LLMEngine
from adapterd.server.model import cpu_lora
from adapterd.server.model.batch import LoraBatch
from adapterd.server.model.llama import DecoderLayer, LlamaModel
from adapterd.server.model.lora import LoRALinear, bgmv_embedding_bag, bgmv_reference

from .adapters import lora_state, save_lora
from .models import load_default
from .serving import Server, copies
from .workload import random_prompts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--kind", choices=("base", "one", "distinct"), default="distinct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    max_tokens = args.context + 64 + 16
    config = EngineConfig(
        max_batch=args.batch,
        max_rank=16,
        max_gpu_adapters=max(args.batch, 8),
        kv_cache_tokens=args.batch * max_tokens,
        max_prefill_tokens=args.batch * max_tokens,
    )
    models = load_default()
    with tempfile.TemporaryDirectory(prefix="adapterd-profile-") as work_dir:
        server = Server(models, config, Path(work_dir) / "store", max_cpu_adapters=64)
        server.loop.stop()  # from here on this thread drives the engine
        engine = server.engine
        adapters = _adapters(server, models.config, args, Path(work_dir))
        prompts = random_prompts(args.batch, args.context, models.config.vocab_size, seed=0)
        for index, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
            params = SamplingParams(max_new_tokens=64, ignore_eos=True)
            engine.add_request(f"p{index}", prompt.tolist(), params, adapter, lambda event: None)
        engine.step()  # prefill
        for _ in range(3):
            engine.step()
        result = {
            "kind": args.kind,
            "batch": args.batch,
            "context": args.context,
            "threads": torch.get_num_threads(),
            "phases_ms": phases(engine, args.steps),
            "forward_ms": forward_split(engine, args.steps),
            "top_ops": top_ops(engine, steps=4),
            "lora_op_us": lora_op_variants(engine.runner.model, args.batch, len(adapters)),
            "attention_us": attention_variants(engine),
        }
    out = args.out or Path(__file__).parent / f"profile-{args.kind}.json"
    out.write_text(json.dumps(result, indent=2))
    print_report(result)
    print(f"\nwrote {out}")


def _adapters(server: Server, config: Any, args: argparse.Namespace, work_dir: Path) -> list[Any]:
    if args.kind == "base":
        return [None] * args.batch
    num_distinct = args.batch if args.kind == "distinct" else 1
    dirs = [
        save_lora(work_dir / f"lora-{i}", lora_state(config, 16, i, torch.float32), 16, "profile")
        for i in range(min(num_distinct, 8))
    ]
    loaded = [server.register(f"lora-{i}", d) for i, d in enumerate(dirs)]
    distinct = copies(loaded, num_distinct, "lora")
    return [distinct[i % num_distinct] for i in range(args.batch)]


def phases(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Median ms of each phase of `LLMEngine.step`, run here phase by phase."""
    times: dict[str, list[float]] = defaultdict(list)
    runner = engine.runner
    for _ in range(steps):
        with _timed(times, "schedule"):
            seqs, is_prefill = engine.scheduler.schedule()
        assert not is_prefill
        with _timed(times, "build_batch"):
            batch = runner.build_batch(seqs, is_prefill)
        with _timed(times, "forward"):
            logits = runner.model(batch, runner.kv)
        for seq in seqs:
            seq.num_cached = seq.num_tokens
        with _timed(times, "sample"):
            tokens = engine.choose(logits, seqs)
        with _timed(times, "postprocess"):
            engine.postprocess(seqs, tokens)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    medians["step (sum)"] = sum(medians.values())
    return medians


@contextmanager
def _timed(times: dict[str, list[float]], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    times[name].append(time.perf_counter() - start)


def forward_split(engine: LLMEngine, steps: int) -> dict[str, float]:
    """ms per decode forward by module group, from forward hooks (inclusive times, children subtracted)."""
    model = engine.runner.model
    totals: dict[str, float] = defaultdict(float)
    hooks = _install_timers(model, totals)
    try:
        forward_total = 0.0
        for _ in range(steps):
            seqs, _ = engine.scheduler.schedule()
            batch = engine.runner.build_batch(seqs, False)
            start = time.perf_counter()
            logits = engine.runner.model(batch, engine.runner.kv)
            forward_total += time.perf_counter() - start
            for seq in seqs:
                seq.num_cached = seq.num_tokens
            engine.postprocess(seqs, engine.choose(logits, seqs))
    finally:
        for hook in hooks:
            hook.remove()
    split = {
        "base linears (7 per layer)": totals["base"],
        "LoRA delta (bgmv + add)": totals["lora"] - totals["base"],
        "attention without its linears (rope, KV write, KV gather, sdpa)": totals["attention"]
        - totals["attention.lora"],
        "MLP without its linears (silu, mul)": totals["mlp"] - totals["mlp.lora"],
        "RMSNorm": totals["norm"],
        "LM head": totals["lm_head"],
        "embedding": totals["embed"],
    }
    split["rest (residual adds, rotary table, layer calls)"] = forward_total - sum(split.values())
    split = {name: seconds / steps * 1000 for name, seconds in split.items()}
    split["forward (total)"] = forward_total / steps * 1000
    return split


def _decoder_layers(model: LlamaModel) -> list[DecoderLayer]:
    return [cast(DecoderLayer, layer) for layer in model.layers]


def _install_timers(model: LlamaModel, totals: dict[str, float]) -> list[Any]:
    hooks: list[Any] = []

    def time_module(module: nn.Module, *keys: str) -> None:
        starts: list[float] = []

        def pre(*_: Any) -> None:
            starts.append(time.perf_counter())

        def post(*_: Any) -> None:
            elapsed = time.perf_counter() - starts.pop()
            for key in keys:
                totals[key] += elapsed

        hooks.append(module.register_forward_pre_hook(pre))
        hooks.append(module.register_forward_hook(post))

    for layer in _decoder_layers(model):
        time_module(layer.self_attn, "attention")
        time_module(layer.mlp, "mlp")
        time_module(layer.input_layernorm, "norm")
        time_module(layer.post_attention_layernorm, "norm")
        for parent, group in ((layer.self_attn, "attention.lora"), (layer.mlp, "mlp.lora")):
            for child in parent.children():
                if isinstance(child, LoRALinear):
                    time_module(child, "lora", group)
                    time_module(child.base, "base")
    time_module(model.norm, "norm")
    time_module(model.lm_head, "lm_head")
    time_module(model.embed_tokens, "embed")
    return hooks


VIEW_OPS = frozenset(
    (
        "aten::view",
        "aten::as_strided",
        "aten::transpose",
        "aten::unsqueeze",
        "aten::expand",
        "aten::slice",
        "aten::select",
        "aten::t",
        "aten::reshape",
        "aten::_unsafe_view",
        "aten::alias",
        "aten::detach",
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::resolve_conj",
        "aten::resolve_neg",
        "aten::lift_fresh",
        "aten::result_type",
        "aten::_reshape_alias",
        "aten::permute",
        "aten::squeeze",
    )
)


def top_ops(engine: LLMEngine, steps: int, limit: int = 15) -> dict[str, Any]:
    """The aten ops of whole engine steps, the slowest first, and how many ops a step issues."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    leaves = [e for e in prof.events() if not e.cpu_children and e.name not in VIEW_OPS]
    averages = prof.key_averages()
    top_level = [e for e in averages if e.key.startswith("aten::")]
    events = sorted(top_level, key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    return {
        "aten_calls_per_step": sum(e.count for e in top_level) / steps,
        "leaf_calls_per_step": sum(e.name.startswith("aten::") for e in leaves) / steps,
        "ops": [
            {
                "op": e.key,
                "calls_per_step": e.count / steps,
                "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
            }
            for e in events
        ],
    }


def attention_variants(engine: LLMEngine) -> dict[str, float]:
    """µs per layer of the attention core on the engine's own decode batch and cache (layer 0)."""
    import torch.nn.functional as F

    seqs = list(engine.scheduler.running)
    batch = engine.runner.build_batch(seqs, False)
    attn = _decoder_layers(engine.runner.model)[0].self_attn
    k_cache, v_cache = engine.runner.kv.k[0], engine.runner.kv.v[0]
    groups = attn.num_heads // attn.num_kv_heads
    q = torch.randn(len(seqs), attn.num_heads, 1, attn.head_dim, dtype=k_cache.dtype)
    keys_now = k_cache[batch.read_slots].transpose(1, 2).contiguous()  # what a per-sequence cache holds
    values_now = v_cache[batch.read_slots].transpose(1, 2).contiguous()

    def repeated() -> torch.Tensor:  # llama.py at c02e603: gather the whole context, repeat K/V per head
        keys = k_cache[batch.read_slots].transpose(1, 2)
        values = v_cache[batch.read_slots].transpose(1, 2)
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=batch.attn_mask, scale=attn.scale)

    def gqa() -> torch.Tensor:  # the same gather, no repeat: sdpa's grouped-query mode
        keys = k_cache[batch.read_slots].transpose(1, 2)
        values = v_cache[batch.read_slots].transpose(1, 2)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=batch.attn_mask, scale=attn.scale, enable_gqa=True
        )

    def no_gather() -> torch.Tensor:  # K/V already contiguous per sequence: the floor a paged kernel reaches
        return F.scaled_dot_product_attention(
            q, keys_now, values_now, attn_mask=batch.attn_mask, scale=attn.scale, enable_gqa=True
        )

    assert torch.allclose(repeated(), gqa(), atol=1e-5) and torch.allclose(repeated(), no_gather(), atol=1e-5)
    return {
        "gather + repeat_interleave + sdpa (llama.py at c02e603)": _micro(repeated),
        "gather + sdpa(enable_gqa)": _micro(gqa),
        "sdpa(enable_gqa) on K/V in place": _micro(no_gather),
        "KV gather alone (K and V)": _micro(lambda: (k_cache[batch.read_slots], v_cache[batch.read_slots])),
    }


def lora_op_variants(model: LlamaModel, batch: int, num_slots_used: int) -> dict[str, dict[str, float]]:
    """µs per call of the LoRA delta on each module's shapes, decode (T=1), rows over `num_slots_used` slots."""
    layer = model.lora_linears()[0]
    names = ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")
    return {name: _lora_variants(layer[name], batch, num_slots_used) for name in names}


def _lora_variants(linear: LoRALinear, batch: int, num_slots_used: int) -> dict[str, float]:
    a, b, rows = linear.lora_a, linear.lora_b, linear.lora_rows
    assert a is not None and b is not None and rows is not None
    x = torch.randn(batch, 1, linear.in_features, dtype=a.dtype)
    slots = torch.arange(batch) % max(num_slots_used, 1)
    rank = a.shape[2]
    reference = bgmv_reference(x, a, b, slots, rank)

    def kernel() -> torch.Tensor:  # a fresh LoraBatch: the shrink is not reused from the previous call
        return cpu_lora.add_lora_(torch.zeros_like(reference), x, rows, LoraBatch(slots, rank))

    variants = {
        "base linear": lambda: linear.base(x),
        "bgmv_reference (gather + bmm)": lambda: bgmv_reference(x, a, b, slots, rank),
        "bgmv_embedding_bag": lambda: bgmv_embedding_bag(x, rows, LoraBatch(slots, rank)),
        "C++ kernel (cpu_lora)": kernel,
        "LoRALinear.forward (base + delta)": lambda: linear(x, LoraBatch(slots, rank)),
    }
    if cpu_lora.kernel() is None:
        del variants["C++ kernel (cpu_lora)"]
    with torch.inference_mode():
        for name in ("bgmv_embedding_bag", "C++ kernel (cpu_lora)"):
            if name in variants:
                assert torch.allclose(variants[name](), reference, atol=1e-4, rtol=1e-3), name
    return {name: _micro(fn) for name, fn in variants.items()}


def _micro(fn: Callable[[], object], repeats: int = 200) -> float:
    with torch.inference_mode():
        for _ in range(20):
            fn()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            samples.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(samples)


def print_report(result: dict[str, Any]) -> None:
    print(
        f"decode step, {result['kind']} adapters, batch {result['batch']}, context ~{result['context']}, "
        f"{result['threads']} threads"
    )
    print("\n| phase | ms |\n|---|---:|")
    for name, ms in result["phases_ms"].items():
        print(f"| {name} | {ms:.1f} |")
    forward = result["forward_ms"]
    print("\n| forward, by module | ms | share |\n|---|---:|---:|")
    for name, ms in forward.items():
        print(f"| {name} | {ms:.1f} | {ms / forward['forward (total)'] * 100:.0f}% |")
    ops = result["top_ops"]
    print(
        f"\naten calls per step: {ops['aten_calls_per_step']:.0f} (nested included); innermost ops that are "
        f"not views: {ops['leaf_calls_per_step']:.0f} (about one GPU kernel launch each)"
    )
    print("\n| aten op (self CPU) | calls/step | ms/step |\n|---|---:|---:|")
    for op in ops["ops"]:
        print(f"| {op['op']} | {op['calls_per_step']:.0f} | {op['self_ms_per_step']:.1f} |")
    variants = next(iter(result["lora_op_us"].values())).keys()
    print("\n| module | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for module, timings in result["lora_op_us"].items():
        print(f"| {module} | " + " | ".join(f"{timings[v]:.0f} µs" for v in variants) + " |")
    print("\n| attention core, one layer | µs |\n|---|---:|")
    for name, us in result["attention_us"].items():
        print(f"| {name} | {us:.0f} |")


if __name__ == "__main__":
    main()
