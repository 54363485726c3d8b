"""python -m bench --mode cpu|gpu [--tiny] [--out FILE]: print the tables, write the JSON."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from adapterd.server.common.config import NF4_KERNELS
from adapterd.server.model.loader import Placement

from . import report
from .checks import run_checks
from .models import Models, build_random, load_default
from .run import Bench, engine_config
from .settings import CPU, GPU, GPU_TINY, Settings, llama31_8b_config, tiny_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="gpu mode on a tiny config (runs on a CPU)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results-<mode>.json)")
    parser.add_argument("--repeats", type=int, help="timed runs of each case")
    parser.add_argument("--new-tokens", type=int, help="generated tokens per row")
    parser.add_argument("--peft-mixed-new-tokens", type=int, help="generated tokens per row, PEFT mixed")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--nf4-kernel",
        choices=NF4_KERNELS,
        default="bitsandbytes",
        help="the base's NF4 products (gpu mode): bitsandbytes' or the fused Triton kernel (ADAPTERD_NF4_KERNEL)",
    )
    return parser.parse_args(argv)


def pick_settings(args: argparse.Namespace) -> Settings:
    base = CPU if args.mode == "cpu" else GPU_TINY if args.tiny else GPU
    return base.with_overrides(
        repeats=args.repeats, new_tokens=args.new_tokens, peft_mixed_new_tokens=args.peft_mixed_new_tokens
    )


def load_models(settings: Settings, nf4_kernel: str = "bitsandbytes") -> Models:
    if settings.mode == "cpu":
        return load_default()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if settings.mode == "gpu" and device != "cuda":
        raise SystemExit("--mode gpu needs a CUDA device; use --mode gpu --tiny to try it on a CPU")
    placement = Placement.resolve(device, "nf4", nf4_kernel if device == "cuda" else "bitsandbytes")
    if settings.mode == "gpu":
        return build_random(llama31_8b_config(), "Llama-3.1-8B-shape-random", placement, settings.seed)
    return build_random(tiny_config(), "tiny-llama-random", placement, settings.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = pick_settings(args)
    out = args.out or Path(__file__).parent / f"results-{settings.mode}.json"
    started = time.perf_counter()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"bench {settings.mode}: loading the model")
    models = load_models(settings, args.nf4_kernel)
    results: dict[str, Any] = {
        "settings": asdict(settings),
        "engine_config": asdict(engine_config(settings)),
        "model": models.name,
        "quantize": models.placement.quantize,
        "nf4_kernel": models.placement.nf4_kernel,
        "dtype": str(models.placement.dtype),
        "device": str(models.device),
        "machine": report.machine(),
    }
    with tempfile.TemporaryDirectory(prefix="adapterd-bench-") as work_dir:
        bench = Bench(settings, models, Path(work_dir), log)
        try:
            log("checking the fast paths against the reference paths")
            results["checks"] = run_checks(bench)
            log("warming up")
            bench.warm_up()
            log("throughput (adapterd and PEFT interleaved)")
            results["cases"] = bench.throughput()
            log("time to first token")
            results["ttft"] = bench.ttft()
            log("adapter loads")
            results["loads"] = bench.loads()
            log("Zipf workload")
            results["zipf"] = bench.zipf()
        finally:
            bench.close()
    results["targets"] = report.target_dicts(report.targets(results))
    results["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(results, indent=2))
    print(report.tables(results))
    print(
        f"\n{settings.mode}: {results['model']} ({results['quantize']} via {results['nf4_kernel']}, "
        f"{results['dtype']}) on "
        f"{results['machine'].get('gpu') or results['machine']['cpu']}; wrote {out} "
        f"in {results['wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
