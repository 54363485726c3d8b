"""`adapterd run`: load the model, register the adapters, generate every line in one continuous batch."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from adapterd.server.cli.offline import InputError, Job, adapter_dirs, read_jobs, result_line
from adapterd.server.common.config import EngineConfig
from adapterd.server.common.errors import AdapterdError
from adapterd.server.host.llm import LLM


def engine_config(args: argparse.Namespace, cpu_threads: int = 0) -> EngineConfig:
    """The engine flags of run and serve; `cpu_threads` is used when --cpu-threads is not given."""
    return EngineConfig(
        max_batch=args.max_batch,
        max_rank=args.max_rank,
        max_gpu_adapters=args.max_gpu_adapters,
        max_soft_prompts=args.max_soft_prompts,
        kv_cache_tokens=args.kv_cache_tokens,
        cuda_graphs=not args.enforce_eager,
        prefix_caching=args.prefix_caching,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        cpu_threads=cpu_threads if args.cpu_threads is None else args.cpu_threads,
    )


def run_command(args: argparse.Namespace) -> int:
    try:
        jobs = read_jobs(args.input)
    except (OSError, InputError) as exc:
        return _fail(f"{args.input}:\n{exc}")
    llm = LLM(model=args.model, quantize=args.quantize, device=args.device, engine=engine_config(args))
    try:
        if args.adapters:
            for adapter_id, path in adapter_dirs(args.adapters):
                llm.add_adapter(adapter_id, path)
        _check_requests(llm, jobs)
        completions = llm.generate(job.request for job in jobs)
    except (AdapterdError, InputError) as exc:
        return _fail(str(exc))
    finally:
        llm.close()
    _write_atomically(args.output, [result_line(j.id, c) for j, c in zip(jobs, completions, strict=True)])
    return 0


def _check_requests(llm: LLM, jobs: list[Job]) -> None:
    """Every request's adapter exists and its tokens fit, before any generation starts."""
    problems = []
    for number, job in enumerate(jobs, start=1):
        try:
            adapter = llm.adapters.resolve(job.request.adapter_id)
            llm.engine.check_fits(len(llm.encode(job.request)), job.request.params, adapter)
        except AdapterdError as exc:
            problems.append(f"request {number} (id {job.id!r}): {exc}")
    if problems:
        raise InputError("\n".join(problems))


def _write_atomically(path: Path, lines: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)


def _fail(message: str) -> int:
    print(f"adapterd run: {message}", file=sys.stderr)
    return 2
