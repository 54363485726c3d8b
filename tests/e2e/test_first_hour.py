"""What a new user meets in the first hour, through the real `adapterd` command and a real server: a server
that listens at once and says "loading" until it is ready, logs what it does, one line per request and its
stop; `adapterd model` for training adapters elsewhere on the served weights; --help that lists and explains
everything; a closed pipe that ends a command quietly; and clear answers to the usual first mistakes (OpenAI
names on TGI routes, wrong methods, file-system loads that are off, an adapter made for another base)."""

from __future__ import annotations

import filecmp
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapterd.server.cli.main import build_parser
from adapterd.server.model.resolve import ResolvedModel
from adapterd.v1 import generation_pb2, generation_pb2_grpc
from tests.e2e.serving import ADAPTERD, Server, free_port, wait_healthy
from tests.reference import make_lora_adapter

EXIT_BROKEN_PIPE = 141


def adapterd(*args: str, timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ADAPTERD, *args], capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def server(compat_server: Server) -> Server:
    """The session's shared server (a tiny model with the default model's tokenizer): these tests change
    nothing on it."""
    return compat_server


# -- start-up ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_server_listens_at_once_and_answers_loading_until_ready(tmp_path: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    # An empty cache: this start converts the default model's GGUF file, so loading takes seconds.
    env = {**os.environ, "ADAPTERD_CACHE": str(tmp_path / "cache")}
    log = tmp_path / "server.log"
    command = [ADAPTERD, "serve", "--device", "cpu", "--store", str(tmp_path / "store")]
    command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url, target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    try:
        early = first_answer(f"{url}/v1/models", process)
        assert early.status_code == 503 and early.headers["retry-after"]
        assert (
            early.json()["error"]["type"] == "unavailable" and "loading" in early.json()["error"]["message"]
        )
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)  # gRPC binds after the engine's imports
            checked = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert checked.status == health_pb2.HealthCheckResponse.NOT_SERVING
            request = generation_pb2.GenerateRequest(prompt="Hi")
            with pytest.raises(grpc.RpcError) as refused:
                generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=10)
            assert (
                refused.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in refused.value.details()
            )
            server = Server(process, http_port, grpc_port, log)  # type: ignore[arg-type]
            wait_healthy(server, "server", 300)
            checked = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
        assert httpx.post(f"{url}/generate", json=body, timeout=60).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert process.returncode == 0
    text = log.read_text()
    # What it does, in order: listening, ready (with the load time), each request, stopping, stopped.
    marks = [
        "HTTP listening on",
        "gRPC listening on",
        "ready: model SmolLM2-135M-Instruct",
        '"POST /generate" 200',
        "stopping",
        "stopped",
    ]
    positions = [text.find(mark) for mark in marks]
    assert -1 not in positions and positions == sorted(positions), text[-3000:]
    assert re.search(r"loaded in \d+\.\d s, \d+\.\d s after start", text)
    kernel = text.count("building the CPU LoRA kernel") + text.count("CPU LoRA kernel: the cached build")
    assert kernel <= 1, text  # said once, and as what happens (a build, or the cached one)


def first_answer(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> httpx.Response:
    """The first answer `url` gives once the port accepts connections (the process must not exit first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            return httpx.get(url, timeout=5)
        except httpx.ConnectError:
            time.sleep(0.01)
    raise AssertionError(f"{url} never answered")


# -- the model, for training adapters elsewhere -------------------------------------------------------------


def test_adapterd_model_names_exports_and_explains_the_served_weights(
    default_model: ResolvedModel, tmp_path: Path
) -> None:
    path = adapterd("model", "path")
    assert path.returncode == 0 and path.stdout.strip() == str(default_model.path)
    info = adapterd("model", "info").stdout
    for fact in (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Q4_1",
        "de-quantised",
        "float32",
        str(default_model.path),
    ):
        assert fact in info, info
    target = tmp_path / "smollm2"
    exported = adapterd("model", "export", str(target))
    assert exported.returncode == 0, exported.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(default_model.path / name, target / name, shallow=False), name
    again = adapterd("model", "export", str(target))
    assert (
        again.returncode == 1
        and again.stderr.strip() == f"adapterd: error: {target} exists and is not an empty directory"
    )


# -- help ----------------------------------------------------------------------------------------------------


def test_help_lists_every_command_and_explains_every_serve_option() -> None:
    listing = adapterd("--help").stdout
    for command in ("run", "serve", "trainer", "eval", "model", "generate", "adapters", "train"):
        assert re.search(rf"^\s+{command}\s+\S", listing, re.MULTILINE), (command, listing)
    serve = adapterd("serve", "--help").stdout
    assert (
        "HTTP port (default: 8080)" in serve and "(default: 256)" in serve and "(default: 127.0.0.1)" in serve
    )
    for command in ("serve", "trainer", "eval", "run"):
        parser = build_parser(command)
        [sub] = [a for a in parser._subparsers._group_actions if a.dest == "command"]  # type: ignore[union-attr]
        options = [a for a in sub.choices[command]._actions if a.option_strings and a.dest != "help"]
        unexplained = [a.option_strings[0] for a in options if not a.help]
        assert not unexplained, (command, unexplained)


# -- pipes ---------------------------------------------------------------------------------------------------


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(server: Server) -> None:
    command = [
        ADAPTERD,
        "generate",
        "Once upon a time",
        "--stream",
        "--max-new-tokens",
        "400",
        "--url",
        server.url,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.read(1)  # `| head -c 1`
    process.stdout.close()
    assert process.wait(timeout=120) == EXIT_BROKEN_PIPE
    assert process.stderr.read() == b""


# -- the usual first mistakes ----------------------------------------------------------------------------------


def test_openai_names_on_tgi_routes_are_refused_with_the_right_name(server: Server) -> None:
    answer = httpx.post(f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_tokens": 5}})
    assert answer.status_code == 400
    assert answer.json()["error"].startswith(
        "parameters.max_tokens is OpenAI's name; these (TGI) routes take max_new_tokens"
    )
    typed = httpx.post(f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": "5"}})
    assert typed.status_code == 400 and typed.json()["error"] == "max_new_tokens must be an integer"


def test_a_wrong_method_or_path_is_the_routes_json_error(server: Server) -> None:
    tgi = httpx.get(f"{server.url}/generate")
    assert tgi.status_code == 405 and tgi.headers["allow"] == "POST"
    assert tgi.json() == {
        "error": "/generate does not take GET (it takes POST)",
        "error_type": "method_not_allowed",
    }
    openai = httpx.delete(f"{server.url}/v1/models")
    assert openai.status_code == 405 and openai.json()["error"]["type"] == "method_not_allowed"
    missing = httpx.get(f"{server.url}/v2/models")
    assert missing.status_code == 404 and "/openapi.json" in missing.json()["error"]["message"]


def test_loading_from_the_servers_file_system_says_it_is_off(server: Server, tmp_path: Path) -> None:
    body = {"lora_name": "x", "lora_path": str(tmp_path)}
    answer = httpx.post(f"{server.url}/v1/load_lora_adapter", json=body)
    assert answer.status_code == 403 and "--allowed-lora-dir" in answer.json()["error"]["message"]
    assert "is off" in answer.json()["error"]["message"]


@pytest.mark.slow
def test_an_adapter_for_another_base_is_refused_with_the_cause_first(
    server: Server, default_model: ResolvedModel, tmp_path: Path
) -> None:
    made = make_lora_adapter(
        default_model.path, tmp_path / "for-smollm2", r=4, alpha=8, target_modules="all-linear"
    )
    upload = adapterd("adapters", "upload", "other-base", str(made), "--url", server.url)
    assert upload.returncode == 1
    [line] = upload.stderr.splitlines()
    assert line.startswith("adapterd: error: InvalidRequest: adapter refused (")
    assert (
        f"base_model: this adapter was made for another base model ({default_model.path}, as its "
        "adapter_config.json says), with hidden size 576; this server serves" in line
    )
    problems = int(re.search(r"adapter refused \((\d+) problems\)", line).group(1))  # type: ignore[union-attr]
    assert problems > 30 * 7 and len(line) < 2000  # hundreds of problems, a readable line
    assert httpx.get(f"{server.url}/v1/adapters/other-base").status_code == 404


def test_an_unreadable_keys_file_is_one_line_before_anything_loads(tmp_path: Path) -> None:
    bad = tmp_path / "keys"
    bad.write_text("only-a-key\n")
    for keys, reason in ((tmp_path / "missing", "No such file"), (bad, "expected 'KEY ROLE [TENANT]'")):
        done = adapterd("serve", "--api-keys", str(keys), "--http-port", str(free_port()), timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        [line] = [line for line in done.stderr.splitlines() if "ERROR" in line]
        assert f"cannot read --api-keys {keys}" in line and reason in line
        assert "listening" not in done.stderr  # refused before binding or loading anything
