"""One training job, run in its own process: `python -m adapterd.server.trainer.worker JOB_DIR ...`.

The job directory holds config.json, data.jsonl and optionally eval_data.jsonl and tasks/ (shipped lm-eval
tasks); the worker leaves the trained adapter in JOB_DIR/adapter and the adapter's held-out predictions in
JOB_DIR/predictions.jsonl. The config's eval_tasks are loaded first (a task that cannot load fails the job
before training) and scored after training, for the base and the adapter in one continuous batch.
Events go to stdout as JSON lines (anything else that writes to stdout is moved to stderr):
`{"event": "phase", "phase": ...}`, `{"event": "data", ...}`, `{"event": "progress", ...}`,
`{"event": "metrics", "base": ..., "adapter": ..., "tasks": ...}` and, on failure,
`{"event": "error", "message": ...}`.
The exit status is 0 on success and non-zero on any failure, a signal included.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

CONFIG_FILE = "config.json"
DATA_FILE = "data.jsonl"
EVAL_DATA_FILE = "eval_data.jsonl"
ADAPTER_DIR = "adapter"
PREDICTIONS_FILE = "predictions.jsonl"
TASKS_DIR = "tasks"
PR_SET_PDEATHSIG = 1


class Events:
    """JSON lines on a private copy of stdout; stdout itself then points at stderr."""

    def __init__(self) -> None:
        self.out: IO[str] = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def emit(self, event: str, **fields: Any) -> None:
        self.out.write(json.dumps({"event": event, **fields}) + "\n")

    def phase(self, phase: str) -> None:
        self.emit("phase", phase=phase)

    def progress(self, progress: Any) -> None:
        self.emit("progress", **asdict(progress))


def run(job_dir: Path, model_dir: Path, device: str, events: Events) -> None:
    from adapterd.server.common.config import EngineConfig
    from adapterd.server.model.loader import Placement
    from adapterd.server.model.tokenizer import load_tokenizer
    from adapterd.server.trainer.config import JobConfig
    from adapterd.server.trainer.data import IGNORE_INDEX, read_examples, split_held_out, tokenize
    from adapterd.server.trainer.evaluate import evaluate_local
    from adapterd.server.trainer.train import train

    events.phase("loading")
    config = JobConfig.from_dict(json.loads((job_dir / CONFIG_FILE).read_text()))
    tasks = load_tasks(job_dir, config.eval_tasks)
    data = read_file(job_dir / DATA_FILE, "data", read_examples)
    eval_data = read_file(job_dir / EVAL_DATA_FILE, "eval_data", read_examples)
    assert data is not None
    train_examples, held_out = split_held_out(data, eval_data, config.seed)
    placement = Placement.resolve(device, "nf4" if config.method == "qlora" else "none")
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise RuntimeError(f"the base model at {model_dir} has no tokenizer")
    tokenized = [tokenize(tokenizer, e, tokenizer.eos_token_id, config.max_seq_len) for e in train_examples]
    tokenized = [t for t in tokenized if any(label != IGNORE_INDEX for label in t.labels)]
    if not tokenized:
        raise ValueError(f"every training prompt is longer than max_seq_len ({config.max_seq_len} tokens)")
    events.emit("data", num_train_examples=len(tokenized), num_eval_examples=len(held_out))

    engine = EngineConfig(
        max_rank=config.rank,
        max_gpu_adapters=1,
        max_soft_prompts=1,
        max_virtual_tokens=max(config.num_virtual_tokens, EngineConfig.max_virtual_tokens),
    )
    quantize, device_name = placement.quantize, placement.device.type
    events.phase("evaluating_base")
    base, _, _ = evaluate_local(model_dir, quantize, device_name, held_out, engine=engine)
    events.emit("metrics", base=base.to_dict())

    events.phase("training")
    adapter_dir = job_dir / ADAPTER_DIR
    train(config, model_dir, placement, tokenized, adapter_dir, events.progress)

    events.phase("evaluating_adapter")
    adapter, predictions, task_scores = evaluate_local(
        model_dir, quantize, device_name, held_out, adapter_dir, engine, tasks
    )
    with (job_dir / PREDICTIONS_FILE).open("w") as out:
        for example, prediction in zip(held_out, predictions, strict=True):
            out.write(json.dumps({"line": example.line, "prediction": prediction}) + "\n")
    scores = {"base": base.to_dict(), "adapter": adapter.to_dict()}
    events.emit("metrics", **scores, **({"tasks": task_scores} if task_scores is not None else {}))


def load_tasks(job_dir: Path, names: tuple[str, ...]) -> Any:
    """None without eval_tasks; else `evaluate_local`'s `tasks`: lm-eval's tasks loaded now (from the shipped
    tasks/ and lm-eval's own), with the worker working in tasks/ so that relative data_files resolve there."""
    if not names:
        return None
    import warnings

    from lm_eval.tasks import get_task_dict

    from adapterd.server.trainer.evaluate import evaluate_tasks
    from adapterd.server.trainer.tasks import task_manager

    root = job_dir / TASKS_DIR
    if root.is_dir():
        os.chdir(root)
    manager = task_manager(root if root.is_dir() else None, names)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            get_task_dict(list(names), manager)
    except Exception as exc:  # lm-eval's errors are plain exceptions: a missing file, a bad field
        raise ValueError(f"eval_tasks: cannot load {', '.join(names)}: {type(exc).__name__}: {exc}") from exc
    return lambda llm, adapter_id: evaluate_tasks(llm, adapter_id, names, manager)


def read_file(path: Path, name: str, parse: Any) -> Any:
    if not path.exists():
        return None
    with path.open("rb") as lines:
        return parse(lines, name)


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the trainer dies, so no orphan keeps training."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no such call
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapterd-trainer-worker")
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--model-dir", type=Path, required=True, help="the base model's HF directory")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = parser.parse_args(argv)
    die_with_parent()
    events = Events()
    try:
        run(args.job_dir.resolve(), args.model_dir.resolve(), args.device, events)
    except Exception as exc:
        traceback.print_exc()
        events.emit("error", message=f"{type(exc).__name__}: {exc}" if _is_bug(exc) else str(exc))
        return 1
    return 0


def _is_bug(exc: Exception) -> bool:
    from adapterd.server.common.errors import AdapterdError

    return not isinstance(exc, AdapterdError | ValueError)


if __name__ == "__main__":
    sys.exit(main())
