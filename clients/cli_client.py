"""`adapterd generate` and `adapterd adapters list|show|upload|delete`: the server's HTTP API from a shell.
Readable output by default, `--json` for scripts; `--url` (default $ADAPTERD_URL, else
http://127.0.0.1:8080) and `--api-key` (default $ADAPTERD_API_KEY) on every command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from adapterd.clients._output import adapter_shape, adapters_table, human_bytes, key_values, print_json
from adapterd.clients.client import Client


def connection_options(url_help: str) -> argparse.ArgumentParser:
    """The options every client command takes (a parent parser)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--url", help=url_help)
    options.add_argument("--api-key", help="API key (default: $ADAPTERD_API_KEY)")
    options.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for an answer (default 60)"
    )
    options.add_argument("--json", action="store_true", help="print JSON instead of readable text")
    return options


SERVER_OPTIONS = connection_options("server URL (default: $ADAPTERD_URL, else http://127.0.0.1:8080)")


def add_client_commands(commands: Any) -> None:
    _add_generate(commands)
    adapters = commands.add_parser("adapters", help="list, show, upload and delete the server's adapters")
    actions = adapters.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[SERVER_OPTIONS], help="every adapter").set_defaults(
        handler=adapters_list
    )
    show = actions.add_parser("show", parents=[SERVER_OPTIONS], help="one adapter's description")
    show.add_argument("adapter_id")
    show.set_defaults(handler=adapters_show)
    upload = actions.add_parser(
        "upload", parents=[SERVER_OPTIONS], help="upload a PEFT adapter directory or a tar archive of one"
    )
    upload.add_argument("adapter_id")
    upload.add_argument(
        "path",
        type=Path,
        help="directory with adapter_config.json and adapter_model.safetensors, or a tar (.tar, .tar.gz) of it",
    )
    upload.add_argument("--metadata", type=json_object, help="a JSON object kept with the adapter version")
    upload.set_defaults(handler=adapters_upload)
    delete = actions.add_parser("delete", parents=[SERVER_OPTIONS], help="delete an adapter")
    delete.add_argument("adapter_id")
    delete.set_defaults(handler=adapters_delete)


def _add_generate(commands: Any) -> None:
    generate = commands.add_parser("generate", parents=[SERVER_OPTIONS], help="generate text with the server")
    generate.add_argument("prompt", help="the prompt; - reads it from stdin")
    generate.add_argument(
        "--adapter", "--adapter-id", dest="adapter_id", help="adapter id (default: base model)"
    )
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    generate.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--temperature", type=float, help="0 (default) is greedy decoding")
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--repetition-penalty", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    generate.add_argument(
        "--ignore-eos", action="store_true", default=None, help="generate past end-of-sequence"
    )
    generate.add_argument("--min-tokens", type=int, help="no end-of-sequence or stop token before this many")
    generate.add_argument(
        "--stop-token-id", dest="stop_token_ids", type=int, action="append", help="(repeatable)"
    )
    generate.add_argument(
        "--logit-bias", type=token_bias, action="append", metavar="ID=BIAS", help="(repeatable), -100..100"
    )
    generate.add_argument("--presence-penalty", type=float)
    generate.add_argument("--frequency-penalty", type=float)
    structured = generate.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", type=json_object, help="the output is JSON matching this schema")
    structured.add_argument(
        "--json-object", action="store_true", default=None, help="the output is a JSON object"
    )
    structured.add_argument("--regex", help="the output matches this regular expression")
    structured.add_argument("--grammar", help="the output is text of this Lark grammar")
    structured.add_argument("--choice", action="append", help="the output is one of these (repeatable)")
    generate.set_defaults(handler=generate_command)


def emit(args: argparse.Namespace, value: Any, text: str) -> int:
    """`value` as JSON with --json, else `text`; the command's exit status."""
    if args.json:
        print_json(value)
    else:
        print(text)
    return 0


def server_client(args: argparse.Namespace) -> Client:
    return Client(args.url, api_key=args.api_key, timeout=args.timeout)


SAMPLING_ARGS = (
    *("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "ignore_eos"),
    *("min_tokens", "stop_token_ids", "presence_penalty", "frequency_penalty"),
    *("json_schema", "json_object", "regex", "grammar", "choice"),
)


def token_bias(text: str) -> tuple[int, float]:
    """`ID=BIAS`, e.g. `50256=-100`."""
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ID=BIAS") from None


def generate_command(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options: Any = {name: getattr(args, name) for name in SAMPLING_ARGS}
    options["logit_bias"] = dict(args.logit_bias) if args.logit_bias else None
    with server_client(args) as client:
        if args.chat:
            generation = client.chat([{"role": "user", "content": prompt}], args.adapter_id, **options)
        elif args.stream:
            return _stream(client, prompt, args, options)
        else:
            generation = client.generate(prompt, args.adapter_id, **options)
    return emit(args, generation, generation.text)


def _stream(client: Client, prompt: str, args: argparse.Namespace, options: Any) -> int:
    """Each token's text as it comes (--json: one JSON object per token; the last has the generation)."""
    for token in client.generate_stream(prompt, args.adapter_id, **options):
        if args.json:
            print_json(token)
        else:
            sys.stdout.write(token.text)
        sys.stdout.flush()
    if not args.json:
        sys.stdout.write("\n")
    return 0


def adapters_list(args: argparse.Namespace) -> int:
    with server_client(args) as client:
        adapters = client.list_adapters()
    return emit(args, adapters, adapters_table(adapters))


def adapters_show(args: argparse.Namespace) -> int:
    with server_client(args) as client:
        adapter = client.get_adapter(args.adapter_id)
    return emit(args, adapter, key_values(dataclasses.asdict(adapter)))


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def adapters_upload(args: argparse.Namespace) -> int:
    with server_client(args) as client:
        adapter = client.upload_adapter(args.adapter_id, args.path, args.metadata)
    shape, size = adapter_shape(adapter), human_bytes(adapter.size_bytes)
    text = f"uploaded {adapter.id}: version {adapter.version}, {adapter.type} {shape}, {size}, sha256 {adapter.sha256[:12]}"
    return emit(args, adapter, text)


def adapters_delete(args: argparse.Namespace) -> int:
    with server_client(args) as client:
        client.delete_adapter(args.adapter_id)
    return emit(args, {"id": args.adapter_id, "deleted": True}, f"deleted {args.adapter_id}")
