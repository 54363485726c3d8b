"""`adapterd trainer` (the training service) and `adapterd eval` (lm-eval tasks, or a held-out JSONL file
through a server): their options and handlers, which the `adapterd` command wires
(`python -m adapterd.server.trainer.cli trainer|eval ...` runs them alone)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client-only install has no torch: server modules are imported when run
    from adapterd.server.common.auth import ApiKeys
    from adapterd.server.trainer.jobs import JobStore
    from adapterd.server.trainer.service import Base

log = logging.getLogger("adapterd.trainer")


def env_api_key() -> str | None:
    """The server's API key from the environment (keeps it off the command line and out of `ps`)."""
    return os.environ.get("ADAPTERD_API_KEY")


def add_trainer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="http://127.0.0.1:8080", help="the adapterd server's HTTP URL")
    parser.add_argument(
        "--server-grpc",
        help="the server's gRPC address (host:port); when given, uploads go over gRPC instead of HTTP",
    )
    parser.add_argument(
        "--server-api-key", default=env_api_key(), help="admin key (default: $ADAPTERD_API_KEY)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind HTTP and gRPC to")
    parser.add_argument("--http-port", type=int, default=8081, help="HTTP port")
    parser.add_argument("--grpc-port", type=int, default=50052, help="gRPC port")
    parser.add_argument("--work-dir", type=Path, help="jobs and their files (default: <cache>/trainer)")
    parser.add_argument("--model", default="default", help="the server's base model: default | PATH | HUB_ID")
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: CUDA if present"
    )
    parser.add_argument("--api-keys", type=Path, help="keys for the trainer's own API ('KEY ROLE [TENANT]')")


def trainer_command(args: argparse.Namespace) -> int:
    from adapterd.server.common.auth import ApiKeys
    from adapterd.server.common.config import default_cache_dir
    from adapterd.server.model.loader import Placement
    from adapterd.server.model.resolve import resolve_model
    from adapterd.server.trainer.jobs import JobStore
    from adapterd.server.trainer.service import Base

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to the server otherwise
    keys = ApiKeys.load(args.api_keys) if args.api_keys else ApiKeys.open()
    resolved = resolve_model(args.model, default_cache_dir())
    dtype = str(Placement.resolve(args.device, "none").dtype).removeprefix("torch.")
    base = Base(resolved.name, resolved.path, args.device, dtype)
    try:
        store = JobStore(args.work_dir or default_cache_dir() / "trainer")
        log.info("training adapters of %s for %s; jobs in %s", base.name, args.server, store.root)
        asyncio.run(serve(args, store, base, keys))
    except OSError as exc:  # the work directory in use, a port in use
        log.error("%s", exc)
        return 2
    return 0


async def serve(args: argparse.Namespace, store: JobStore, base: Base, keys: ApiKeys) -> None:
    import uvicorn

    from adapterd.server.trainer.grpc_api import start_grpc_server
    from adapterd.server.trainer.http_api import build_app
    from adapterd.server.trainer.remote import ServerClient
    from adapterd.server.trainer.service import TrainerService

    server = ServerClient(args.server, args.server_api_key, args.server_grpc)
    service = TrainerService(store, base, server)
    config = uvicorn.Config(
        build_app(service, keys),
        host=args.host,
        port=args.http_port,
        log_level="warning",
        lifespan="off",
    )
    http = uvicorn.Server(config)
    grpc_server = await start_grpc_server(service, keys, f"{args.host}:{args.grpc_port}")
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    runner = asyncio.create_task(service.run_forever())
    http_task = asyncio.create_task(http.serve())
    log.info("serving HTTP on %s:%d and gRPC on %s:%d", args.host, args.http_port, args.host, args.grpc_port)
    await asyncio.wait([http_task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    runner.cancel()  # stops a running worker; its job is marked failed, as after a crash
    with suppress(asyncio.CancelledError):
        await runner
    http.should_exit = True
    await http_task
    await grpc_server.stop(grace=2)
    await server.close()


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_argument_group("lm-evaluation-harness tasks (--tasks)")
    tasks.add_argument("--tasks", help="lm-eval task names or local task names, comma-separated")
    tasks.add_argument("--adapters", help="adapter ids (with --server), or ID=PATH / PEFT directories")
    tasks.add_argument("--base", action="store_true", help="score the base model too (the default alone)")
    tasks.add_argument("--limit", type=int, help="documents per task (for a quick look)")
    tasks.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (the task's default)")
    tasks.add_argument("--include-path", type=Path, help="a directory of local task YAML files")
    tasks.add_argument(
        "--model", default="default", help="the base model (with --server: its tokenizer only)"
    )
    tasks.add_argument("--tokenizer", help="the base model's Hugging Face directory (default: --model's)")
    tasks.add_argument("--quantize", default="auto", help="in-process engine: auto|nf4|int8|none")
    tasks.add_argument("--device", default="auto", help="in-process engine: auto|cuda|cpu")
    held_out = parser.add_argument_group("a held-out JSONL file (--data): exact match and ROUGE")
    held_out.add_argument("--data", type=Path, help="JSONL: prompt/completion or messages")
    held_out.add_argument("--adapter-id", help="the adapter to score (default: the base model)")
    parser.add_argument(
        "--server",
        help="an adapterd server's HTTP URL (--data: default http://127.0.0.1:8080; --tasks: "
        "without it an in-process engine runs)",
    )
    parser.add_argument("--api-key", default=env_api_key(), help="API key (default: $ADAPTERD_API_KEY)")
    parser.add_argument("--out", type=Path, help="--data: each prediction (JSONL); --tasks: a directory")
    parser.add_argument("--json", action="store_true", help="--data: print the scores as JSON, not a table")


def eval_command(args: argparse.Namespace) -> int:
    from adapterd.server.common.errors import AdapterdError, CommandFailed

    if args.tasks:
        from adapterd.server.evaluation.compare import tasks_command

        return tasks_command(args)
    if not args.data:
        print(
            "adapterd: error: eval: give --tasks (lm-eval tasks) or --data (a held-out JSONL file)",
            file=sys.stderr,
        )
        return 2
    try:
        scores = {"adapter_id": args.adapter_id, **asyncio.run(_evaluate(args))}
    except AdapterdError as exc:
        raise CommandFailed(str(exc)) from exc
    print(json.dumps(scores, indent=2) if args.json else _scores_table(scores))
    return 0


def _scores_table(scores: dict[str, Any]) -> str:
    width = max(len(name) for name in scores)
    return "\n".join(
        f"{name.ljust(width)}  {value:.4f}" if isinstance(value, float) else f"{name.ljust(width)}  {value}"
        for name, value in {**scores, "adapter_id": scores["adapter_id"] or "(the base model)"}.items()
    )


async def _evaluate(args: argparse.Namespace) -> dict[str, object]:
    from adapterd.server.trainer.data import read_examples
    from adapterd.server.trainer.evaluate import evaluate_remote
    from adapterd.server.trainer.remote import ServerClient

    with args.data.open("rb") as lines:
        examples = read_examples(lines, str(args.data))
    server = ServerClient(args.server or "http://127.0.0.1:8080", args.api_key)
    try:
        scores, predictions = await evaluate_remote(server, examples, args.adapter_id)
    finally:
        await server.close()
    if args.out:
        with args.out.open("w") as out:
            for example, prediction in zip(examples, predictions, strict=True):
                out.write(json.dumps({"line": example.line, "prediction": prediction}) + "\n")
    return scores.to_dict()


def configure_trainer(parser: argparse.ArgumentParser) -> None:
    """`adapterd trainer`'s options and handler, on the parser the `adapterd` command made for it."""
    add_trainer_args(parser)
    parser.set_defaults(handler=trainer_command)


def configure_eval(parser: argparse.ArgumentParser) -> None:
    """`adapterd eval`'s, likewise."""
    add_eval_args(parser)
    parser.set_defaults(handler=eval_command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapterd")
    commands = parser.add_subparsers(dest="command", required=True)
    configure_trainer(commands.add_parser("trainer"))
    configure_eval(commands.add_parser("eval"))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
