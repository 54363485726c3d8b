"""The `adapterd` command. Server-side commands import torch lazily, so the client install stays light."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

SERVER_EXTRA_HINT = "this command needs the server extras: pip install 'adapterd[server]'"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="default | PATH (HF dir or .gguf) | HUB_ID")
    parser.add_argument("--quantize", default="auto", choices=["auto", "nf4", "int8", "none"])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--max-gpu-adapters", type=int, default=8)
    parser.add_argument("--max-soft-prompts", type=int, default=8)
    parser.add_argument("--kv-cache-tokens", type=int, default=16384, help="KV cache budget in tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterd", description="adapter model server")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="offline batch inference over JSONL")
    run.add_argument("--in", dest="input", type=Path, required=True, help="requests.jsonl")
    run.add_argument("--out", dest="output", type=Path, required=True, help="results.jsonl")
    run.add_argument("--adapters", type=Path, help="directory with one PEFT adapter directory per id")
    add_model_args(run)
    serve = commands.add_parser("serve", help="serve HTTP and gRPC over one engine")
    add_model_args(serve)
    _add_serve_args(serve)
    return parser


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    try:
        from adapterd.server.cli_serve import add_serve_args
    except ImportError:  # the client-only install: `serve` explains what is missing when run
        return
    add_serve_args(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "serve"):
        try:
            from adapterd.server.cli_run import run_command
            from adapterd.server.cli_serve import serve_command
        except ImportError as exc:
            print(f"adapterd: {SERVER_EXTRA_HINT} ({exc})", file=sys.stderr)
            return 2
        return run_command(args) if args.command == "run" else serve_command(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
