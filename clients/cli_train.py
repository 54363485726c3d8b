"""`adapterd train submit|status|cancel|list`: the trainer's HTTP API from a shell, with a live progress
bar while a job runs (`--watch`). `--url` defaults to $ADAPTERD_TRAINER_URL, else http://127.0.0.1:8081."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from adapterd.clients._output import ProgressPrinter, job_details, jobs_table, print_json
from adapterd.clients._trainer import ENDED, Job
from adapterd.clients.cli_client import connection_options, emit
from adapterd.clients.client import TrainerClient

TRAINER_OPTIONS = connection_options(
    "trainer URL (default: $ADAPTERD_TRAINER_URL, else http://127.0.0.1:8081)"
)
# Hyper-parameter flags: (flag name = config key, type, help).
HYPER_PARAMETERS: tuple[tuple[str, type, str], ...] = (
    ("rank", int, "LoRA rank"),
    ("alpha", float, "LoRA alpha"),
    ("num_virtual_tokens", int, "virtual tokens (prompt_tuning, p_tuning, prefix_tuning)"),
    ("epochs", int, "passes over the data"),
    ("max_steps", int, "optimizer steps (overrides epochs)"),
    ("learning_rate", float, "peak learning rate"),
    ("batch_size", int, "examples per step"),
    ("max_seq_len", int, "longest example in tokens"),
    ("seed", int, "seed"),
    ("prompt_tuning_init_text", str, "text whose embeddings start the soft prompt (prompt_tuning)"),
)


def add_train_commands(commands: Any) -> None:
    train = commands.add_parser("train", help="submit, follow, cancel and list training jobs")
    actions = train.add_subparsers(dest="action", required=True)
    _add_submit(actions)
    status = actions.add_parser("status", parents=[TRAINER_OPTIONS], help="one job; --watch follows it")
    status.add_argument("job_id")
    status.add_argument("--watch", action="store_true", help="show live progress until the job ends")
    status.set_defaults(handler=status_command)
    cancel = actions.add_parser("cancel", parents=[TRAINER_OPTIONS], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=cancel_command)
    actions.add_parser("list", parents=[TRAINER_OPTIONS], help="every job").set_defaults(handler=list_command)


def _add_submit(actions: Any) -> None:
    submit = actions.add_parser("submit", parents=[TRAINER_OPTIONS], help="queue a training job")
    submit.add_argument("--data", type=Path, required=True, help="training data (JSONL)")
    submit.add_argument("--eval-data", type=Path, help="held-out data (JSONL)")
    submit.add_argument("--config", type=Path, help="job config (JSON); the flags below override it")
    submit.add_argument("--adapter-id", help="id of the adapter to train")
    submit.add_argument(
        "--method", choices=["lora", "qlora", "dora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning"]
    )
    submit.add_argument("--target-modules", help="comma-separated module names")
    submit.add_argument(
        "--eval-tasks", help="comma-separated lm-eval tasks to score the base and the adapter on"
    )
    submit.add_argument(
        "--include-path", type=Path, help="a directory of lm-eval task YAML and data to ship for --eval-tasks"
    )
    submit.add_argument(
        "--register-if",
        metavar="TASK:METRIC:MIN_DELTA",
        help="register the adapter only if it beats the base by MIN_DELTA on TASK's METRIC",
    )
    for name, kind, text in HYPER_PARAMETERS:
        submit.add_argument(f"--{name.replace('_', '-')}", type=kind, help=text)
    submit.add_argument("--watch", action="store_true", help="show live progress until the job ends")
    submit.set_defaults(handler=submit_command, parser=submit)


def job_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
    flags = {name: getattr(args, name) for name, _, _ in HYPER_PARAMETERS}
    flags.update(adapter_id=args.adapter_id, method=args.method)
    if args.target_modules:
        flags["target_modules"] = args.target_modules.split(",")
    if args.eval_tasks:
        flags["eval_tasks"] = [t for t in args.eval_tasks.split(",") if t]
    if args.register_if:
        flags["register_if"] = _gate(args)
    config.update({name: value for name, value in flags.items() if value is not None})
    missing = [name for name in ("adapter_id", "method") if not config.get(name)]
    if missing:
        args.parser.error(f"the job config needs {' and '.join(missing)} (--config or --adapter-id/--method)")
    return config


def _gate(args: argparse.Namespace) -> dict[str, Any]:
    task, _, rest = args.register_if.partition(":")
    metric, _, min_delta = rest.rpartition(":")
    try:
        return {"task": task, "metric": metric, "min_delta": float(min_delta)}
    except ValueError:
        args.parser.error(
            f"--register-if wants TASK:METRIC:MIN_DELTA, e.g. my_task:acc:0.02, not {args.register_if!r}"
        )
        raise


def trainer_client(args: argparse.Namespace) -> TrainerClient:
    return TrainerClient(args.url, api_key=args.api_key, timeout=args.timeout)


def submit_command(args: argparse.Namespace) -> int:
    config = job_config(args)
    with trainer_client(args) as client:
        job = client.submit(config, args.data, args.eval_data, args.include_path)
        if args.watch:
            return follow(client, job, args.json)
    return emit(
        args,
        job,
        f"submitted job {job['id']}: {job.get('method')} adapter {job.get('adapter_id')}, {job.get('status')}",
    )


def status_command(args: argparse.Namespace) -> int:
    with trainer_client(args) as client:
        job = client.get(args.job_id)
        if args.watch:
            return follow(client, job, args.json)
    return emit(args, job, job_details(job))


def cancel_command(args: argparse.Namespace) -> int:
    with trainer_client(args) as client:
        job = client.cancel(args.job_id)
    return emit(args, job, f"job {job['id']}: {job.get('status')}")


def list_command(args: argparse.Namespace) -> int:
    with trainer_client(args) as client:
        jobs = client.list()
    return emit(args, jobs, jobs_table(jobs))


def follow(client: TrainerClient, job: Job, as_json: bool) -> int:
    """Show the job's progress until it ends (--json: the job after each change, one per line), then its
    details. Exit status 0 when it succeeded."""
    printer = ProgressPrinter()
    show = print_json if as_json else printer.update
    show(job)
    if job.get("status") not in ENDED:
        for changed in client.watch(job["id"]):
            show(changed)
            if changed.get("status") in ENDED:
                break
    printer.finish()
    job = client.get(job["id"])
    if not as_json:
        print(job_details(job))
    return 0 if job.get("status") == "succeeded" else 1
