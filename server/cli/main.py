"""The `adapterd` command. Client commands (generate, adapters, train) need only the plain install;
server-side commands (run, serve, trainer) import torch lazily, so the client install stays light."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adapterd.clients.cli_client import add_client_commands
from adapterd.clients.cli_train import add_train_commands
from adapterd.clients.errors import AdapterdClientError
from adapterd.server.cli.model import add_model_command
from adapterd.server.common.errors import CommandFailed

SERVER_EXTRA_HINT = "this command needs the server extras: pip install 'adapterd[server]'"


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`, refused with a clear message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model and engine flags of run and serve; their defaults are EngineConfig's (the one place)."""
    from adapterd.server.common.config import EngineConfig  # plain dataclasses: no torch

    defaults = EngineConfig()
    parser.add_argument(
        "--model",
        default="default",
        help="default (SmolLM2-135M-Instruct; see `adapterd model info`) | PATH (HF dir or .gguf) | HUB_ID",
    )
    parser.add_argument(
        "--quantize",
        default="auto",
        choices=["auto", "nf4", "int8", "none"],
        help="base weights: auto is nf4 on CUDA and none (bf16 where fast, else fp32) on a CPU",
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: CUDA if present"
    )
    parser.add_argument(
        "--max-batch", type=at_least(1), default=defaults.max_batch, help="sequences in the running batch"
    )
    parser.add_argument(
        "--max-rank",
        type=at_least(1),
        default=defaults.max_rank,
        help="largest LoRA rank served (device slots are padded to it: set it to your largest)",
    )
    parser.add_argument(
        "--max-gpu-adapters",
        type=at_least(1),
        default=defaults.max_gpu_adapters,
        help="LoRA-family adapters in device slots at once (a batch mixes at most this many)",
    )
    parser.add_argument(
        "--max-soft-prompts",
        type=at_least(1),
        default=defaults.max_soft_prompts,
        help="soft-prompt and prefix adapters in device slots at once",
    )
    parser.add_argument(
        "--kv-cache-tokens",
        type=at_least(defaults.kv_block_size),
        default=defaults.kv_cache_tokens,
        help="KV cache budget in tokens",
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=at_least(0),
        default=defaults.prefill_chunk_tokens,
        help="prompt tokens a step computes next to the requests that decode (chunked prefill; "
        "default: 64 on a CPU, 256 on a GPU)",
    )
    parser.add_argument(
        "--cpu-threads",
        type=at_least(0),
        help="torch threads of the engine on a CPU (serve: every core but one, left to the front end; "
        "run: every core; 0: every core)",
    )
    parser.add_argument(
        "--enforce-eager", action="store_true", help="run decode steps eagerly, without CUDA graphs (GPU)"
    )
    parser.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="recompute every prompt (default: reuse cached KV blocks of the same model and leading tokens)",
    )


class DefaultsShown(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it has none or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            action.default in (None, False, argparse.SUPPRESS)
            or "default" in text
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """A command's parser: its --help shows its options' defaults (unless the command formats its own)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsShown)
        super().__init__(**kwargs)


TRAINER_HELP = "the training service: jobs that train, evaluate and register adapters (HTTP and gRPC)"
EVAL_HELP = "score the base model and adapters: lm-eval tasks (--tasks) or a held-out JSONL file (--data)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """`command` is the command the line names: the server commands' own options come from modules that
    import torch, so they are added only for that command (the others are listed, for --help), and client
    commands start fast."""
    parser = argparse.ArgumentParser(prog="adapterd", description="adapter model server")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    run = commands.add_parser("run", help="offline batch inference over JSONL")
    run.add_argument("--in", dest="input", type=Path, required=True, help="requests.jsonl")
    run.add_argument("--out", dest="output", type=Path, required=True, help="results.jsonl")
    run.add_argument("--adapters", type=Path, help="directory with one PEFT adapter directory per id")
    add_model_args(run)
    serve = commands.add_parser("serve", help="serve HTTP and gRPC over one engine")
    add_model_args(serve)
    if command == "serve":
        _add_serve_args(serve)
    for name, help_text in (("trainer", TRAINER_HELP), ("eval", EVAL_HELP)):
        server_side = commands.add_parser(name, help=help_text, description=help_text)
        if command == name:
            _add_trainer_args(server_side, name)
    add_model_command(commands)
    add_client_commands(commands)
    add_train_commands(commands)
    return parser


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    try:
        from adapterd.server.cli.serve import add_serve_args
    except ImportError:  # the client-only install: `serve` explains what is missing when run
        return
    add_serve_args(parser)


def _add_trainer_args(parser: argparse.ArgumentParser, command: str) -> None:
    """`adapterd trainer` (the training side-service) and `adapterd eval`: their options and `handler`
    (args -> exit status) come from adapterd.server.trainer.cli, as the client commands' do."""
    try:
        from adapterd.server.trainer.cli import configure_eval, configure_trainer
    except ImportError:
        return
    (configure_trainer if command == "trainer" else configure_eval)(parser)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    if hasattr(args, "handler"):
        return run_handler(args)
    if args.command in ("run", "serve"):
        try:  # only the command's own module: `serve` binds its port before the engine's imports
            if args.command == "run":
                from adapterd.server.cli.run import run_command as command
            else:
                from adapterd.server.cli.serve import serve_command as command
        except ImportError as exc:
            print(f"adapterd: {SERVER_EXTRA_HINT} ({exc})", file=sys.stderr)
            return 2
        return command(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


EXIT_BROKEN_PIPE = 128 + 13  # as a Unix tool killed by SIGPIPE reports it: `adapterd adapters list | head -1`


def run_handler(args: argparse.Namespace) -> int:
    """Run a command; a refused request or an unreadable file is one line on stderr and exit status 1; a
    reader that closed the pipe (`| head`) ends the command quietly; a server command on the client-only
    install names the extras it needs."""
    try:
        return int(args.handler(args))
    except AdapterdClientError as exc:
        return _fail(f"{type(exc).__name__}: {exc.message}")
    except CommandFailed as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        # Later writes (and the interpreter's last flush) go nowhere, not to a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        return _fail(str(exc))
    except ModuleNotFoundError as exc:  # torch, transformers, lm-eval: the server side is not installed
        print(f"adapterd: {SERVER_EXTRA_HINT} (missing: {exc.name})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    print(f"adapterd: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
