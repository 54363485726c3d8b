"""Targets (issue 6), the printed tables and the machine description written with the JSON."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

import torch

TARGET_CPU_VS_PEFT = 3.0
TARGET_CPU_VS_BASE = 0.8
TARGET_GPU_TOK_S = 5000.0
TARGET_GPU_VS_BASE = 0.9
TARGET_GPU_STREAM_TOK_S = 150.0
TARGET_GPU_SOFT_VS_LORA = 0.9
TARGET_GPU_ZIPF_VS_RESIDENT = 0.8
TARGET_GPU_SLOT_FILL_S = 0.005


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    threshold: float
    unit: str
    applies: bool  # False: shown for information (the target is for the other mode)
    lower_is_better: bool = False

    @property
    def status(self) -> str:
        met = self.value <= self.threshold if self.lower_is_better else self.value >= self.threshold
        return ("PASS" if met else "FAIL") if self.applies else ("(met)" if met else "(not met)")


def _median(
    results: dict[str, Any], key: str, system: str = "adapterd", metric: str = "decode_tok_s"
) -> float:
    return float(results["cases"][key][system][metric]["median"])


def targets(results: dict[str, Any]) -> list[Target]:
    settings, cases = results["settings"], results["cases"]
    batch, top = settings["batch"], max(settings["distinct_batches"])
    on_gpu, on_cpu = settings["mode"] == "gpu", settings["mode"] == "cpu"  # gpu-tiny: information only

    def ratio(key: str, other: str, system: str = "adapterd", metric: str = "decode_tok_s") -> float:
        return _median(results, key, metric=metric) / _median(results, other, system, metric)

    distinct, base = f"distinct-{top}", f"base-{top}" if f"base-{top}" in cases else f"base-{batch}"
    same_batch_lora = f"distinct-{batch}" if f"distinct-{batch}" in cases else distinct
    zipf = results["zipf"]
    zipf_ratio = zipf["zipf"]["e2e_tok_s"]["median"] / zipf["all_resident"]["e2e_tok_s"]["median"]
    per_cpu = "decode_tok_per_cpu_s"
    vs_base = TARGET_GPU_VS_BASE if on_gpu else TARGET_CPU_VS_BASE
    return [
        Target(
            f"{top} distinct LoRA vs PEFT mixed batch",
            ratio(distinct, distinct, "peft"),
            TARGET_CPU_VS_PEFT,
            "x",
            on_cpu,
        ),
        Target(
            "  same, per CPU-second",
            ratio(distinct, distinct, "peft", per_cpu),
            TARGET_CPU_VS_PEFT,
            "x",
            False,
        ),
        Target(
            f"{top} distinct LoRA vs adapterd base", ratio(distinct, base), vs_base, "x", on_gpu or on_cpu
        ),
        Target("  same, per CPU-second", ratio(distinct, base, metric=per_cpu), vs_base, "x", False),
        Target(
            f"{top} distinct LoRA decode throughput",
            _median(results, distinct),
            TARGET_GPU_TOK_S,
            "tok/s",
            on_gpu,
        ),
        Target(
            "one stream decode throughput",
            _median(results, "stream-1"),
            TARGET_GPU_STREAM_TOK_S,
            "tok/s",
            on_gpu,
        ),
        Target(
            "soft prompts mixed in vs all LoRA",
            ratio(f"soft-{batch}", same_batch_lora),
            TARGET_GPU_SOFT_VS_LORA,
            "x",
            on_gpu,
        ),
        Target("Zipf workload vs all resident", zipf_ratio, TARGET_GPU_ZIPF_VS_RESIDENT, "x", on_gpu),
        Target(
            "host -> device slot",
            results["loads"]["host_to_slot_s"]["median"] * 1000,
            TARGET_GPU_SLOT_FILL_S * 1000,
            "ms",
            on_gpu,
            lower_is_better=True,
        ),
    ]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--", "server", "adapters")),
    }
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _spread(spread: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if not spread:
        return "n/a"
    m, lo, hi = (spread[k] * scale for k in ("median", "min", "max"))
    if len(spread["samples"]) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _ratio(ours: dict[str, Any], peft: dict[str, Any], metric: str) -> str:
    return f"{ours[metric]['median'] / peft[metric]['median']:.2f}x" if peft else "n/a"


def checks_table(checks: dict[str, Any]) -> list[str]:
    graphs, kernels = checks["graphs_vs_eager"], checks["lora_kernels"]
    path = "CUDA graphs replayed" if graphs["captured"] else "padded graph path, run eagerly"
    lines = [
        "| check (before timing) | result |",
        "|---|---|",
        f"| {path} vs eager, {graphs['rows']} rows of LoRA + soft prompts | "
        f"{graphs['token_agreement']:.1%} of {graphs['tokens']} tokens agree, "
        f"{graphs['rows_identical']}/{graphs['rows']} rows identical |",
    ]
    if not kernels["ran"]:
        return [*lines, f"| {kernels['op']} vs bgmv_reference | not run: {kernels['why']} |", ""]
    for op_and_shape, error in kernels["max_relative_error"].items():
        lines.append(f"| {op_and_shape}: vs bgmv_reference | max error {error:.2e} of the delta |")
    return [*lines, ""]


def tables(results: dict[str, Any]) -> str:
    lines = [
        *(checks_table(results["checks"]) if "checks" in results else []),
        "| case | B | adapterd decode tok/s | PEFT decode tok/s | adapterd / PEFT | same, per CPU-second "
        "| adapterd prefill ms | PEFT prefill ms | adapterd e2e tok/s | PEFT e2e tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in results["cases"].values():
        ours, peft = case["adapterd"], case.get("peft") or {}
        lines.append(
            f"| {case['title']} | {case['batch']} | {_spread(ours['decode_tok_s'])} "
            f"| {_spread(peft.get('decode_tok_s'))} | {_ratio(ours, peft, 'decode_tok_s')} "
            f"| {_ratio(ours, peft, 'decode_tok_per_cpu_s')} | {_spread(ours['prefill_s'], 1000, 0)} "
            f"| {_spread(peft.get('prefill_s'), 1000, 0)} | {_spread(ours['e2e_tok_s'])} "
            f"| {_spread(peft.get('e2e_tok_s'))} |"
        )
    ttft, loads, zipf = results["ttft"], results["loads"], results["zipf"]
    lines += [
        "",
        "| latency / load | adapterd ms | PEFT ms |",
        "|---|---:|---:|",
        f"| time to first token, LoRA in a slot | {_spread(ttft['adapterd_resident_s'], 1000)} "
        f"| {_spread(ttft['peft_s'], 1000)} |",
        f"| time to first token, LoRA not in a slot | {_spread(ttft['adapterd_not_in_slot_s'], 1000)} | |",
        f"| publish (validate, copy into the store) | {_spread(loads['publish_s'], 1000)} | |",
        f"| cold load: disk -> servable (host memory) | {_spread(loads['disk_to_host_s'], 1000)} "
        f"| {_spread(loads['peft_load_adapter_s'], 1000)} (load_adapter, disk -> device) |",
        f"| host memory -> device slot | {_spread(loads['host_to_slot_s'], 1000, 2)} | |",
        "",
        f"Zipf workload (s={zipf['zipf_s']}): {zipf['num_requests']} requests over {zipf['num_adapters']} "
        f"adapters in host memory ({zipf['num_distinct_requested']} distinct requested), "
        f"{zipf['num_slots']} device slots, slot loads per run {zipf['slot_loads']}.",
        "",
        "| workload | generated tok/s (prefills included) | seconds |",
        "|---|---:|---:|",
        f"| every adapter already in a slot | {_spread(zipf['all_resident']['e2e_tok_s'])} "
        f"| {_spread(zipf['all_resident']['total_s'], digits=2)} |",
        f"| Zipf through the slots | {_spread(zipf['zipf']['e2e_tok_s'])} "
        f"| {_spread(zipf['zipf']['total_s'], digits=2)} |",
        "",
        "| target | measured | target | status |",
        "|---|---:|---:|---|",
    ]
    for target in results["targets"]:
        sign = "<=" if target["lower_is_better"] else ">="
        lines.append(
            f"| {target['name']} | {target['value']:.2f} {target['unit']} "
            f"| {sign} {target['threshold']:g} {target['unit']} | {target['status']} |"
        )
    return "\n".join(lines)


def target_dicts(found: list[Target]) -> list[dict[str, Any]]:
    return [{**asdict(t), "status": t.status} for t in found]
