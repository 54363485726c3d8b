"""The benchmark run: set both sides up, time every case (adapterd and PEFT interleaved), collect results."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapterd.adapters.format import WEIGHTS_FILE
from adapterd.server.common.config import EngineConfig
from adapterd.server.engine.adapter_slots import LoadedAdapter

from .adapters import lora_state, save_lora, save_prompt
from .models import Models
from .peft_side import PeftSide
from .serving import Row, Server, copies
from .settings import Settings
from .timing import Run, Spread
from .workload import Case, cases, random_prompts, zipf_draw

Log = Callable[[str], object]


def engine_config(s: Settings) -> EngineConfig:
    max_tokens = s.num_virtual_tokens + max(s.prompt_tokens, s.zipf_prompt_tokens)
    max_tokens += max(s.new_tokens, s.zipf_new_tokens * 3 // 2) + 16
    return EngineConfig(
        max_batch=s.max_batch,
        max_rank=s.rank,
        max_gpu_adapters=s.num_zipf_slots,
        max_soft_prompts=max(1, s.batch // 2),
        max_virtual_tokens=max(s.num_virtual_tokens, 1),
        kv_cache_tokens=s.max_batch * max_tokens,
        max_prefill_tokens=s.max_batch * max_tokens,  # a whole batch prefills in one step
    )


class Bench:
    def __init__(self, settings: Settings, models: Models, work_dir: Path, log: Log = print) -> None:
        self.s = settings
        self.models = models
        self.log = log
        self.vocab_size = models.config.vocab_size
        self.server = Server(models, engine_config(settings), work_dir / "store", max_cpu_adapters=1024)
        states = [
            lora_state(models.config, settings.rank, i, models.placement.dtype)
            for i in range(settings.distinct_weights)
        ]
        self.lora_dirs = [
            save_lora(work_dir / f"lora-{i}", state, settings.rank, models.name)
            for i, state in enumerate(states)
        ]
        self.base_loras = [self.server.register(f"lora-{i}", d) for i, d in enumerate(self.lora_dirs)]
        self.loras = copies(self.base_loras, max(settings.distinct_batches), "lora")
        self.prompts = [
            self.server.register(f"prompt-{i}", d) for i, d in enumerate(self._write_prompts(work_dir))
        ]
        num_peft = max(settings.distinct_batches)
        self.peft = PeftSide(models.hf_model, states, num_peft, settings.rank, models.name, models.device)
        self.case_list = cases(settings.batch, settings.distinct_batches)

    def _write_prompts(self, work_dir: Path) -> list[Path]:
        hidden, num_virtual = self.models.config.hidden_size, self.s.num_virtual_tokens
        return [
            save_prompt(work_dir / f"prompt-{i}", hidden, num_virtual, i, self.models.name)
            for i in range(self.s.batch // 2)
        ]

    def close(self) -> None:
        self.server.close()

    # ---- throughput cases ----

    def rows(self, case: Case, prompts: torch.Tensor, max_new_tokens: int) -> list[Row]:
        adapters: list[LoadedAdapter | None]
        if case.kind == "base":
            adapters = [None] * case.batch
        elif case.kind in ("one", "stream"):
            adapters = [self.loras[0]] * case.batch
        elif case.kind == "distinct":
            adapters = list(self.loras[: case.batch])
        else:  # soft: even rows a distinct LoRA, odd rows a distinct soft prompt
            adapters = [self.loras[i // 2] if i % 2 == 0 else self.prompts[i // 2] for i in range(case.batch)]
        return [Row(p.tolist(), a, max_new_tokens) for p, a in zip(prompts, adapters, strict=True)]

    def peft_adapters(self, case: Case) -> str | list[str] | None:
        if case.kind == "base":
            return None
        if case.kind in ("one", "stream"):
            return "lora-0"
        return [f"lora-{i}" for i in range(case.batch)]

    def run_adapterd(
        self, case: Case, seed: int, max_new_tokens: int | None = None, prompt_tokens: int | None = None
    ) -> Run:
        prompts = random_prompts(case.batch, prompt_tokens or self.s.prompt_tokens, self.vocab_size, seed)
        return self.server.run(self.rows(case, prompts, max_new_tokens or self.s.new_tokens))

    def run_peft(
        self, case: Case, seed: int, max_new_tokens: int | None = None, prompt_tokens: int | None = None
    ) -> Run:
        prompts = random_prompts(case.batch, prompt_tokens or self.s.prompt_tokens, self.vocab_size, seed)
        if max_new_tokens is None:
            max_new_tokens = self.s.peft_mixed_new_tokens if case.kind == "distinct" else self.s.new_tokens
        return self.peft.run(prompts, max_new_tokens, self.peft_adapters(case))

    def warm_up(self) -> None:
        """First calls pay one-time costs (allocations, thread pools, adapters into slots): not timed."""
        for case in self.case_list:
            self.run_adapterd(case, seed=10_000, max_new_tokens=2, prompt_tokens=16)
            if case.kind != "soft":
                self.run_peft(case, seed=10_000, max_new_tokens=2, prompt_tokens=16)

    def throughput(self) -> dict[str, dict[str, Any]]:
        runs: dict[str, dict[str, list[Run]]] = {c.key: {"adapterd": [], "peft": []} for c in self.case_list}
        for repeat in range(self.s.repeats):
            for case in self.case_list:
                seed = self.s.seed + repeat
                runs[case.key]["adapterd"].append(
                    self._logged("adapterd", case, self.run_adapterd(case, seed))
                )
                if case.kind != "soft":  # PEFT cannot batch LoRA and prompt tuning together
                    runs[case.key]["peft"].append(self._logged("peft", case, self.run_peft(case, seed)))
        return {
            case.key: {
                "title": case.title,
                "batch": case.batch,
                "kind": case.kind,
                **{system: summarize(system_runs) for system, system_runs in runs[case.key].items()},
            }
            for case in self.case_list
        }

    def _logged(self, system: str, case: Case, run: Run) -> Run:
        self.log(
            f"  {system:8s} {case.key:12s} decode {run.decode_tok_s:9.1f} tok/s  "
            f"prefill {run.prefill_s * 1000:8.1f} ms  total {run.total_s:6.2f} s"
        )
        return run

    # ---- latency and loading ----

    def ttft(self) -> dict[str, Any]:
        """Time to first token of one request (prompt of `prompt_tokens`), its LoRA resident or not."""
        stream = Case("ttft", "ttft", 1, "stream")
        warm = [
            self.run_adapterd(stream, seed=i, max_new_tokens=1).prefill_s for i in range(self.s.num_samples)
        ]
        cold = []
        for i, adapter in enumerate(copies(self.base_loras, self.s.num_samples, "ttft")):
            prompt = random_prompts(1, self.s.prompt_tokens, self.vocab_size, seed=i)[0].tolist()
            cold.append(self.server.run([Row(prompt, adapter, 1)]).prefill_s)
        peft = [self.run_peft(stream, seed=i, max_new_tokens=1).prefill_s for i in range(self.s.num_samples)]
        return {
            "adapterd_resident_s": Spread.of(warm).as_dict(),
            "adapterd_not_in_slot_s": Spread.of(cold).as_dict(),
            "peft_s": Spread.of(peft).as_dict(),
        }

    def loads(self) -> dict[str, Any]:
        """Publishing (validate + copy into the store), disk -> servable (host), host -> device slot."""
        ids = [f"cold-{i}" for i in range(self.s.num_samples)]
        publish, resolve = [], []
        for adapter_id in ids:
            start = time.perf_counter()
            self.server.registry.add(adapter_id, self.lora_dirs[0])
            publish.append(time.perf_counter() - start)
        for adapter_id in ids:
            start = time.perf_counter()
            self.server.registry.resolve(adapter_id)
            resolve.append(time.perf_counter() - start)
        fills = self.server.time_slot_fills(copies(self.base_loras, self.s.num_samples, "fill"))
        num_peft = max(2, self.s.num_samples // 4)
        peft = [self.peft.time_load(self.lora_dirs[0], f"cold-{i}") for i in range(num_peft)]
        return {
            "publish_s": Spread.of(publish).as_dict(),
            "disk_to_host_s": Spread.of(resolve).as_dict(),
            "host_to_slot_s": Spread.of(fills).as_dict(),
            "peft_load_adapter_s": Spread.of(peft).as_dict(),
            "adapter_bytes": (self.lora_dirs[0] / WEIGHTS_FILE).stat().st_size,
        }

    # ---- many adapters ----

    def zipf(self) -> dict[str, Any]:
        """Requests over many host-resident adapters through few slots, against all adapters resident."""
        s = self.s
        draw = zipf_draw(s.num_zipf_requests, s.num_zipf_adapters, s.zipf_s, s.zipf_new_tokens, s.seed)
        adapters = copies(self.base_loras, s.num_zipf_adapters, "zipf")
        prompts = random_prompts(s.num_zipf_requests, s.zipf_prompt_tokens, self.vocab_size, s.seed + 7)
        workload = [
            Row(p.tolist(), adapters[k], n)
            for p, k, n in zip(prompts, draw.adapter_index, draw.max_new_tokens, strict=True)
        ]
        resident_set = adapters[: s.num_zipf_slots]
        resident = [
            Row(row.prompt_ids, resident_set[k % s.num_zipf_slots], row.max_new_tokens)
            for row, k in zip(workload, draw.adapter_index, strict=True)
        ]
        runs: dict[str, list[Run]] = {"all_resident": [], "zipf": []}
        loads, evictions = [], []
        for _ in range(min(s.repeats, 2)):
            self.server.time_slot_fills(resident_set)  # place them (untimed here)
            runs["all_resident"].append(self.server.run(resident))
            before = (self.server.num_slot_loads, self.server.num_slot_evictions)
            runs["zipf"].append(self.server.run(workload))
            loads.append(self.server.num_slot_loads - before[0])
            evictions.append(self.server.num_slot_evictions - before[1])
            self.log(
                f"  zipf: all resident {runs['all_resident'][-1].e2e_tok_s:.1f} tok/s, "
                f"zipf {runs['zipf'][-1].e2e_tok_s:.1f} tok/s, {loads[-1]} slot loads"
            )
        return {
            "num_adapters": s.num_zipf_adapters,
            "num_slots": s.num_zipf_slots,
            "num_requests": s.num_zipf_requests,
            "num_distinct_requested": draw.num_distinct,
            "zipf_s": s.zipf_s,
            "slot_loads": loads,
            "slot_evictions": evictions,
            "all_resident": summarize(runs["all_resident"]),
            "zipf": summarize(runs["zipf"]),
        }


def summarize(runs: list[Run]) -> dict[str, Any]:
    if not runs:
        return {}
    return {
        "decode_tok_s": Spread.of([r.decode_tok_s for r in runs]).as_dict(),
        "decode_tok_per_cpu_s": Spread.of([r.decode_tok_per_cpu_s for r in runs]).as_dict(),
        "e2e_tok_s": Spread.of([r.e2e_tok_s for r in runs]).as_dict(),
        "prefill_s": Spread.of([r.prefill_s for r in runs]).as_dict(),
        "total_s": Spread.of([r.total_s for r in runs]).as_dict(),
        "runs": [r.as_dict() for r in runs],
    }
