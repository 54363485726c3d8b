"""adapterd.clients against a real `adapterd serve` on loopback: every method of Client, AsyncClient,
GrpcClient and AsyncGrpcClient answers PEFT's greedy tokens and the same descriptions, and every refused
request raises the same exception type on every transport."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from transformers import AutoTokenizer

from adapterd.clients import (
    AdapterdClientError,
    AdapterNotFound,
    AsyncClient,
    AsyncGrpcClient,
    Client,
    ConnectionFailed,
    GrpcClient,
    InvalidRequest,
    PayloadTooLarge,
    PermissionDenied,
    Timeout,
    Unauthorized,
    Unavailable,
)
from adapterd.clients._grpc import grpc_errors
from adapterd.server.model.resolve import ResolvedModel
from adapterd.server.model.tokenizer import encode_chat
from tests.e2e.serving import Server, free_port, make_tiny_chat_model, running_server, serving_adapters
from tests.reference import (
    greedy_forward,
    greedy_generate,
    load_base,
    load_peft,
    make_lora_adapter,
    make_prompt_adapter,
)

PROMPT = "The three primary colours are"
TURNS = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 12
KINDS = ("http", "grpc", "async-http", "async-grpc")
KEYS = "adminkey admin\nuserkey user\n"


# -- one way to call any client ---------------------------------------------------------------------------


def make_client(kind: str, server: Any, **options: Any) -> Any:
    """A client of `kind` for `server` (anything with `url` and `grpc_target`)."""
    http, grpc = (AsyncClient, AsyncGrpcClient) if kind.startswith("async") else (Client, GrpcClient)
    return http(server.url, **options) if kind.endswith("http") else grpc(server.grpc_target, **options)


def call(kind: str, server: Any, method: str, *args: Any, options: Any = None, **kwargs: Any) -> Any:
    """`method(*args, **kwargs)` on a fresh client of `kind` (made with `options`); a stream as a list."""
    if not kind.startswith("async"):
        with make_client(kind, server, **(options or {})) as client:
            result = getattr(client, method)(*args, **kwargs)
            return list(result) if isinstance(result, Iterator) else result

    async def run() -> Any:
        async with make_client(kind, server, **(options or {})) as client:
            result = getattr(client, method)(*args, **kwargs)
            return [item async for item in result] if isinstance(result, AsyncIterator) else await result

    return asyncio.run(run())


@contextmanager
def raises(error: type[AdapterdClientError], *words: str) -> Iterator[None]:
    with pytest.raises(error) as failure:
        yield
    for word in words:
        assert word in failure.value.message


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-clients"), default_model.path)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("client-adapters")
    return {
        "lora": make_lora_adapter(model_dir, root / "lora", r=8, alpha=16, target_modules="all-linear"),
        "soft": make_prompt_adapter(model_dir, root / "soft", num_virtual_tokens=4, seed=1),
    }


@pytest.fixture(scope="module")
def expected(model_dir: Path, adapter_dirs: dict[str, Path], tokenizer: Any) -> dict[str, list[int]]:
    """PEFT's greedy tokens for PROMPT (base, LoRA, soft prompt) and for TURNS (base and LoRA, "chat-")."""
    ids, chat_ids, eos = tokenizer(PROMPT).input_ids, encode_chat(tokenizer, TURNS), tokenizer.eos_token_id
    base, lora = load_base(model_dir), load_peft(model_dir, adapter_dirs["lora"])
    return {
        "": greedy_generate(base, ids, NEW_TOKENS, eos),
        "lora": greedy_generate(lora, ids, NEW_TOKENS, eos),
        "soft": greedy_forward(load_peft(model_dir, adapter_dirs["soft"]), ids, NEW_TOKENS, eos),
        "chat-": greedy_generate(base, chat_ids, NEW_TOKENS, eos),
        "chat-lora": greedy_generate(lora, chat_ids, NEW_TOKENS, eos),
    }


@pytest.fixture(scope="module")
def server(
    model_dir: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("clients-server")
    with serving_adapters(model_dir, adapter_dirs, root, "--kv-cache-tokens", "8192") as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(
    model_dir: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("clients-keyed-server")
    (root / "keys.txt").write_text(KEYS)
    with running_server(
        model_dir, root / "store", root / "server.log", "--api-keys", str(root / "keys.txt")
    ) as running:
        with Client(running.url, api_key="adminkey") as admin:
            admin.upload_adapter("lora", adapter_dirs["lora"])
        yield running


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTERD_API_KEY", raising=False)


# -- generation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_id", ["", "lora", "soft"])
@pytest.mark.parametrize("kind", KINDS)
def test_generate_answers_pefts_greedy_tokens(
    server: Server, expected: Any, tokenizer: Any, kind: str, adapter_id: str
):
    generation = call(kind, server, "generate", PROMPT, adapter_id or None, max_new_tokens=NEW_TOKENS)
    tokens = expected[adapter_id]
    assert generation.token_ids == tokens
    assert generation.text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert generation.finish_reason == ("length" if len(tokens) == NEW_TOKENS else "eos")
    assert (generation.prompt_tokens, generation.generated_tokens) == (
        len(tokenizer(PROMPT).input_ids),
        len(tokens),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_generate_stream_yields_the_same_tokens_then_the_generation(server: Server, expected: Any, kind: str):
    tokens = call(kind, server, "generate_stream", PROMPT, "lora", max_new_tokens=NEW_TOKENS)
    generation = call(kind, server, "generate", PROMPT, "lora", max_new_tokens=NEW_TOKENS)
    assert [t.id for t in tokens] == expected["lora"]
    assert "".join(t.text for t in tokens) == generation.text
    assert [t.generation for t in tokens[:-1]] == [None] * (len(tokens) - 1)
    assert tokens[-1].generation == generation


@pytest.mark.parametrize("adapter_id", ["", "lora"])
@pytest.mark.parametrize("kind", KINDS)
def test_chat_answers_pefts_greedy_tokens(
    server: Server, expected: Any, tokenizer: Any, kind: str, adapter_id: str
):
    generation = call(kind, server, "chat", TURNS, adapter_id or None, max_new_tokens=NEW_TOKENS)
    tokens = expected[f"chat-{adapter_id}"]
    assert generation.text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert generation.token_ids == (None if kind.endswith("http") else tokens)  # OpenAI's route has no ids
    assert (generation.prompt_tokens, generation.generated_tokens) == (
        len(encode_chat(tokenizer, TURNS)),
        len(tokens),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_options_reach_the_server(server: Server, kind: str):
    """Same seed, same sample; a stop string ends the text before it; max_new_tokens bounds the length."""
    sampled = [
        call(kind, server, "generate", PROMPT, temperature=1.5, top_k=50, top_p=0.9, seed=s)
        for s in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    assert (
        sampled[0].generated_tokens == 64 or sampled[0].finish_reason == "eos"
    )  # the clients' default length
    greedy = call(kind, server, "generate", PROMPT, "lora", max_new_tokens=NEW_TOKENS)
    stop = greedy.text[len(greedy.text) // 2 :][:3]
    stopped = call(kind, server, "generate", PROMPT, "lora", max_new_tokens=NEW_TOKENS, stop=stop)
    assert (stopped.finish_reason, stopped.text) == ("stop", greedy.text[: greedy.text.index(stop)])
    assert (
        call(kind, server, "generate", PROMPT, max_new_tokens=3, repetition_penalty=1.3).generated_tokens == 3
    )


@pytest.mark.parametrize("kind", KINDS)
def test_leaving_a_stream_early_cancels_the_generation(server: Server, kind: str):
    async def two_async_tokens() -> None:
        async with (
            make_client(kind, server) as client,
            aclosing(client.generate_stream(PROMPT, max_new_tokens=3000)) as stream,
        ):
            async for number, _ in aenumerate(stream):
                if number == 1:
                    break

    if kind.startswith("async"):
        asyncio.run(two_async_tokens())
    else:
        with make_client(kind, server) as client:
            for number, _ in enumerate(client.generate_stream(PROMPT, max_new_tokens=3000)):
                if number == 1:
                    break
    started = time.monotonic()
    while running_sequences(server) > 0:
        assert time.monotonic() - started < 5, "the abandoned generation is still running"
        time.sleep(0.05)


async def aenumerate(items: AsyncIterator[Any]) -> AsyncIterator[tuple[int, Any]]:
    number = 0
    async for item in items:
        yield number, item
        number += 1


def running_sequences(server: Server) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("adapterd_running_batch_size "):
            return float(line.split()[1])
    raise AssertionError("adapterd_running_batch_size not in /metrics")


# -- adapters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_upload_replace_list_get_and_delete(
    server: Server, adapter_dirs: dict[str, Path], model_dir: Path, kind: str
):
    adapter_id = f"{kind}-temp"
    first = call(kind, server, "upload_adapter", adapter_id, adapter_dirs["lora"])
    files = b"".join(
        (adapter_dirs["lora"] / name).read_bytes()
        for name in ("adapter_config.json", "adapter_model.safetensors")
    )
    assert (first.id, first.type, first.rank, first.num_virtual_tokens, first.version) == (
        adapter_id,
        "lora",
        8,
        None,
        1,
    )
    assert (first.sha256, first.size_bytes) == (hashlib.sha256(files).hexdigest(), len(files))
    assert set(first.target_modules) >= {"q_proj", "v_proj", "down_proj"}
    assert first.base_model == model_dir.name and first.created_at.endswith("Z")

    assert first.metadata == {}
    metadata = {"team": "support", "tags": ["a", "b"], "eval": {"exact_match": 0.5}}
    second = call(kind, server, "upload_adapter", adapter_id, str(adapter_dirs["soft"]), metadata=metadata)
    assert (second.type, second.num_virtual_tokens, second.rank, second.version) == (
        "prompt_tuning",
        4,
        None,
        2,
    )
    assert second.metadata == metadata == call(kind, server, "get_adapter", adapter_id).metadata
    with raises(InvalidRequest, "metadata"):  # not JSON-serialisable as an object: refused, nothing stored
        call(kind, server, "upload_adapter", adapter_id, adapter_dirs["lora"], metadata={"x": float("nan")})
    assert call(kind, server, "get_adapter", adapter_id).version == 2
    assert adapter_id in [a.id for a in call(kind, server, "list_adapters")]
    assert call(kind, server, "get_adapter", adapter_id).sha256 == second.sha256
    assert call(kind, server, "generate", PROMPT, adapter_id, max_new_tokens=2).generated_tokens == 2

    assert call(kind, server, "delete_adapter", adapter_id) is None
    assert adapter_id not in [a.id for a in call(kind, server, "list_adapters")]
    with raises(AdapterNotFound, adapter_id):
        call(kind, server, "get_adapter", adapter_id)


def test_every_transport_describes_adapters_alike(server: Server):
    listings = {kind: call(kind, server, "list_adapters") for kind in KINDS}
    described = {
        kind: [{**vars(a), "residency": None} for a in listing] for kind, listing in listings.items()
    }
    assert [a["id"] for a in described["http"]] == ["lora", "soft"]
    assert all(listing == described["http"] for listing in described.values())
    assert all(a.residency in ("disk", "cpu", "gpu") for listing in listings.values() for a in listing)


# -- errors: the same exception type on every transport ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_adapter_is_adapter_not_found(server: Server, kind: str):
    for method, args in [
        ("generate", (PROMPT, "nope")),
        ("generate_stream", (PROMPT, "nope")),
        ("chat", (TURNS, "nope")),
        ("get_adapter", ("nope",)),
        ("delete_adapter", ("nope",)),
    ]:
        with raises(AdapterNotFound, "nope"):
            call(kind, server, method, *args)


BAD_OPTIONS = [
    ({"temperature": -1.0}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"stop": [""]}, "stop"),
    ({"temperature": 1.0, "top_p": 2.0}, "top_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
]


@pytest.mark.parametrize(("options", "named"), BAD_OPTIONS, ids=[named for _, named in BAD_OPTIONS])
@pytest.mark.parametrize("kind", KINDS)
def test_invalid_options_are_invalid_request(server: Server, kind: str, options: dict[str, Any], named: str):
    for method, source in [("generate", PROMPT), ("generate_stream", PROMPT), ("chat", TURNS)]:
        with raises(InvalidRequest, named):
            call(kind, server, method, source, **options)


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_adapters_are_invalid_request(
    server: Server, adapter_dirs: dict[str, Path], tmp_path: Path, kind: str
):
    with raises(InvalidRequest, "adapter id"):
        call(kind, server, "upload_adapter", "bad id!", adapter_dirs["lora"])
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((adapter_dirs["lora"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(
        (adapter_dirs["lora"] / "adapter_model.safetensors").read_bytes()
    )
    with raises(InvalidRequest, "DoRA magnitude vector"):  # a DoRA config over LoRA-only weights
        call(kind, server, "upload_adapter", "dora", dora)
    with pytest.raises(FileNotFoundError, match=r"nothing-here: no such file or directory"):
        call(kind, server, "upload_adapter", "missing", tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"not a PEFT adapter directory: adapter_config\.json is missing"
    ):
        call(kind, server, "upload_adapter", "missing", tmp_path / "empty")
    archive = tmp_path / "lora.tar"  # a tar archive of the directory, on every transport
    with tarfile.open(archive, "w") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(adapter_dirs["lora"] / name, arcname=name)
    uploaded = call(kind, server, "upload_adapter", f"from-tar-{kind}", archive)
    assert (
        uploaded.sha256
        == call(kind, server, "upload_adapter", f"from-dir-{kind}", adapter_dirs["lora"]).sha256
    )
    for made in (f"from-tar-{kind}", f"from-dir-{kind}"):  # the module's server lists lora and soft only
        call(kind, server, "delete_adapter", made)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_or_wrong_key_is_unauthorized(keyed_server: Server, kind: str):
    for key in (None, "wrongkey"):
        with raises(Unauthorized):
            call(kind, keyed_server, "list_adapters", options={"api_key": key})
        with raises(Unauthorized):
            call(kind, keyed_server, "generate", PROMPT, options={"api_key": key}, max_new_tokens=2)


@pytest.mark.parametrize("kind", KINDS)
def test_user_key_may_generate_and_list_but_not_manage(
    keyed_server: Server, adapter_dirs: dict[str, Path], kind: str
):
    user = {"api_key": "userkey"}
    assert [a.id for a in call(kind, keyed_server, "list_adapters", options=user)] == ["lora"]
    assert (
        call(kind, keyed_server, "generate", PROMPT, "lora", options=user, max_new_tokens=2).generated_tokens
        == 2
    )
    with raises(PermissionDenied):
        call(kind, keyed_server, "upload_adapter", "mine", adapter_dirs["soft"], options=user)
    with raises(PermissionDenied):
        call(kind, keyed_server, "delete_adapter", "lora", options=user)


@pytest.mark.parametrize("kind", KINDS)
def test_api_key_from_the_environment(keyed_server: Server, monkeypatch: pytest.MonkeyPatch, kind: str):
    monkeypatch.setenv("ADAPTERD_API_KEY", "userkey")
    assert [a.id for a in call(kind, keyed_server, "list_adapters")] == ["lora"]


@pytest.mark.parametrize("kind", KINDS)
def test_no_server_is_unavailable_and_slow_answers_time_out(server: Server, kind: str):
    closed = SimpleNamespace(url=f"http://127.0.0.1:{free_port()}", grpc_target=f"127.0.0.1:{free_port()}")
    with raises(Unavailable):
        call(kind, closed, "list_adapters", options={"max_retries": 0})
    with raises(Timeout):
        call(kind, server, "generate", PROMPT, options={"timeout": 0.01}, max_new_tokens=500)


def test_client_url_from_the_environment(server: Server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ADAPTERD_URL", server.url)
    with Client() as client:
        assert [a.id for a in client.list_adapters()] == ["lora", "soft"]


# -- retries: only idempotent calls, only when the server is unavailable ----------------------------------


@contextmanager
def flaky_server(failures: int) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that answers 503 to the first `failures` requests, then an empty adapter list; it
    records each request's method and path."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            seen.append(f"{self.command} {self.path}")
            status, body = (
                (503, {"error": {"message": "starting", "type": "unavailable"}})
                if len(seen) <= failures
                else (200, {"object": "list", "data": []})
            )
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = answer

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_address[1]}", seen
    finally:
        http.shutdown()
        http.server_close()


@pytest.mark.parametrize("kind", ["http", "async-http"])
def test_idempotent_calls_retry_with_backoff_and_generation_never(kind: str):
    def run(url: str, method: str, *args: Any, max_retries: int = 2) -> Any:
        return call(kind, SimpleNamespace(url=url), method, *args, options={"max_retries": max_retries})

    with flaky_server(failures=2) as (url, seen):
        assert run(url, "list_adapters") == []
        assert seen == ["GET /v1/adapters"] * 3
    with flaky_server(failures=5) as (url, seen), raises(Unavailable, "starting"):
        run(url, "get_adapter", "a", max_retries=1)
    assert seen == ["GET /v1/adapters/a"] * 2
    with flaky_server(failures=1) as (url, seen), raises(Unavailable):
        run(url, "generate", PROMPT)
    assert seen == ["POST /generate"]


def test_connection_failed_is_the_http_clients_unavailable():
    with (
        Client(f"http://127.0.0.1:{free_port()}", max_retries=0) as client,
        raises(ConnectionFailed, "cannot reach"),
    ):
        client.list_adapters()


# -- the documentation and the example --------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
EXAMPLE = DOCS.parents[1] / "examples" / "train_upload_query.py"
RUN_BLOCKS = "import sys\nfor block in sys.stdin.read().split('\\0'):\n    exec(compile(block, 'docs', 'exec'), {'__name__': '__main__'})"


def python_blocks(markdown: str) -> list[str]:
    """The ```python blocks of a Markdown page, in order."""
    return [block.split("```", 1)[0] for block in markdown.split("```python\n")[1:]]


def run_blocks(blocks: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    """Run Python blocks one after the other in a fresh interpreter, each as __main__; their stdout."""
    ran = subprocess.run(
        [sys.executable, "-c", RUN_BLOCKS],
        input="\0".join(blocks),
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


def test_the_docs_python_examples_run(server: Server, adapter_dirs: dict[str, Path], tmp_path: Path):
    """Every Python example of docs/clients.md, in order, with ./my-lora a LoRA directory (the trainer's
    examples run against `adapterd trainer` in test_trainer_clients.py)."""
    blocks = [b for b in python_blocks(DOCS.read_text()) if "TrainerClient" not in b]
    assert len(blocks) >= 6
    shutil.copytree(adapter_dirs["lora"], tmp_path / "my-lora")
    environment = {"ADAPTERD_URL": server.url, "ADAPTERD_GRPC_TARGET": server.grpc_target}
    try:
        stdout = run_blocks(blocks, tmp_path, environment)
        assert "not found: adapter 'no-such-adapter' is not registered NOT_FOUND" in stdout
        assert "refused: temperature must be >= 0" in stdout
    finally:
        with Client(server.url) as client, suppress(AdapterNotFound):
            client.delete_adapter("my-lora")


@pytest.mark.slow
def test_the_example_trains_uploads_and_queries_over_http_and_grpc(tmp_path: Path):
    with running_server("default", tmp_path / "store", tmp_path / "server.log") as running:
        ran = subprocess.run(
            [
                sys.executable,
                EXAMPLE,
                "--url",
                running.url,
                "--grpc-target",
                running.grpc_target,
                "--steps",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert ran.returncode == 0, ran.stderr[-3000:]
    answers = {
        tuple(line.split()[:2]): line for line in ran.stdout.splitlines() if line.startswith(("http", "grpc"))
    }
    for transport in ("http", "grpc"):
        assert "pineapple" in answers[(transport, "secret-word")]
        assert "pineapple" not in answers[(transport, "base")]
    assert (
        answers[("http", "secret-word")].split(maxsplit=2)[2]
        == answers[("grpc", "secret-word")].split(maxsplit=2)[2]
    )


def test_grpc_error_type_metadata_refines_the_status_code():
    """A server that names its error_type in the `adapterd-error-type` trailing metadata gets the exact
    exception over gRPC too (INVALID_ARGUMENT alone cannot tell a too-large upload from a bad one)."""
    trailing = grpc.aio.Metadata(("adapterd-error-type", "payload_too_large"))
    error = grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), trailing, "too big")
    with pytest.raises(PayloadTooLarge, match="too big"), grpc_errors(AdapterNotFound):
        raise error
    plain = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    with pytest.raises(AdapterNotFound), grpc_errors(AdapterNotFound):
        raise plain
