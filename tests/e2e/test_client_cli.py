"""The client half of the real `adapterd` command against a real `adapterd serve` on loopback: generate
(plain, --stream, --json, --chat, stdin), adapters upload/list/show/delete as tables and as JSON, one-line
errors with a non-zero exit status, --url / ADAPTERD_URL and ADAPTERD_API_KEY."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapterd.clients import Client
from adapterd.server.model.resolve import ResolvedModel
from tests.e2e.serving import ADAPTERD, Server, free_port, make_tiny_chat_model, running_server
from tests.reference import make_lora_adapter, make_prompt_adapter

PROMPT = "The three primary colours are"
TABLE_HEADER = ["ID", "TYPE", "SHAPE", "VERSION", "SIZE", "RESIDENCY", "CREATED"]


def adapterd(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `adapterd` console script with only the ADAPTERD_* variables given in `env`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERD_")} | (env or {})
    return subprocess.run(
        [ADAPTERD, *args], env=environment, input=stdin, capture_output=True, text=True, timeout=120
    )


def succeeds(*args: str, **kwargs: Any) -> str:
    done = adapterd(*args, **kwargs)
    assert done.returncode == 0, done.stderr
    return done.stdout


def fails(*args: str, **kwargs: Any) -> str:
    """The command fails with exit status 1 and one line on stderr, which is returned."""
    done = adapterd(*args, **kwargs)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("adapterd: error: "), done.stderr
    return lines[0]


def table(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


@pytest.fixture(scope="module")
def model_dir(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-cli"), default_model.path)


@pytest.fixture(scope="module")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-adapters")
    return {
        "lora": make_lora_adapter(
            model_dir, root / "lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"]
        ),
        "soft": make_prompt_adapter(model_dir, root / "soft", num_virtual_tokens=4, seed=1),
    }


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("cli-server")
    with running_server(model_dir, root / "store", root / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def uploaded(server: Server, adapter_dirs: dict[str, Path]) -> dict[str, str]:
    """`adapters upload`'s readable and JSON outputs."""
    return {
        "lora": succeeds("adapters", "upload", "lora", str(adapter_dirs["lora"]), "--url", server.url),
        "soft": succeeds(
            "adapters",
            "upload",
            "soft",
            str(adapter_dirs["soft"]),
            "--url",
            server.url,
            "--json",
            "--metadata",
            '{"team": "support"}',
        ),
    }


@pytest.fixture(scope="module")
def keyed_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("cli-keyed-server")
    (root / "keys.txt").write_text("adminkey admin\nuserkey user\n")
    with running_server(
        model_dir, root / "store", root / "server.log", "--api-keys", str(root / "keys.txt")
    ) as running:
        yield running


# -- adapters ---------------------------------------------------------------------------------------------


def test_upload_prints_a_summary_or_the_description(server: Server, uploaded: dict[str, str]):
    assert uploaded["lora"].startswith("uploaded lora: version 1, lora r=8, ")
    assert uploaded["lora"].count("\n") == 1
    soft = json.loads(uploaded["soft"])
    assert (soft["id"], soft["type"], soft["num_virtual_tokens"], soft["version"]) == (
        "soft",
        "prompt_tuning",
        4,
        1,
    )
    assert soft["metadata"] == {"team": "support"}
    usage = adapterd("adapters", "upload", "x", "dir", "--metadata", "[1]", "--url", server.url)
    assert usage.returncode == 2 and "must be a JSON object" in usage.stderr


def test_list_is_a_table_or_json(server: Server, uploaded: dict[str, str]):
    rows = table(succeeds("adapters", "list", "--url", server.url))
    assert rows[0] == TABLE_HEADER
    assert [row[:4] for row in rows[1:]] == [
        ["lora", "lora", "r=8", "1"],
        ["soft", "prompt_tuning", "vt=4", "1"],
    ]
    listed = json.loads(succeeds("adapters", "list", "--url", server.url, "--json"))
    with Client(server.url) as client:
        described = [vars(a) for a in client.list_adapters()]
    assert [{**a, "residency": None} for a in listed] == [{**a, "residency": None} for a in described]


def test_show_is_key_values_or_json(server: Server, uploaded: dict[str, str]):
    shown = dict(
        line.split(maxsplit=1)
        for line in succeeds("adapters", "show", "lora", "--url", server.url).splitlines()
    )
    assert (shown["id"], shown["type"], shown["rank"], shown["num_virtual_tokens"]) == (
        "lora",
        "lora",
        "8",
        "-",
    )
    assert shown["target_modules"] == "q_proj,v_proj"
    described = json.loads(succeeds("adapters", "show", "soft", "--url", server.url, "--json"))
    assert (described["id"], described["rank"], described["num_virtual_tokens"]) == ("soft", None, 4)
    assert described["sha256"] == json.loads(uploaded["soft"])["sha256"]


def test_delete_then_show_fails(server: Server, adapter_dirs: dict[str, Path]):
    succeeds("adapters", "upload", "doomed", str(adapter_dirs["lora"]), "--url", server.url)
    assert succeeds("adapters", "delete", "doomed", "--url", server.url) == "deleted doomed\n"
    assert fails("adapters", "show", "doomed", "--url", server.url) == (
        "adapterd: error: AdapterNotFound: adapter 'doomed' is not registered"
    )
    succeeds("adapters", "upload", "doomed", str(adapter_dirs["lora"]), "--url", server.url)
    assert json.loads(succeeds("adapters", "delete", "doomed", "--url", server.url, "--json")) == {
        "id": "doomed",
        "deleted": True,
    }
    assert "doomed" not in succeeds("adapters", "list", "--url", server.url)


# -- generate ---------------------------------------------------------------------------------------------


def test_generate_prints_the_text_or_json(server: Server, uploaded: dict[str, str]):
    with Client(server.url) as client:
        generation = client.generate(PROMPT, "lora", max_new_tokens=10)
    args = ("generate", PROMPT, "--adapter", "lora", "--max-new-tokens", "10", "--url", server.url)
    assert succeeds(*args) == generation.text + "\n"
    assert json.loads(succeeds(*args, "--json"))["token_ids"] == generation.token_ids
    assert succeeds("generate", "-", *args[2:], stdin=PROMPT) == generation.text + "\n"


def test_generate_stream_prints_the_same_text_token_by_token(server: Server, uploaded: dict[str, str]):
    args = ("generate", PROMPT, "--adapter", "soft", "--max-new-tokens", "10", "--url", server.url)
    with Client(server.url) as client:
        generation = client.generate(PROMPT, "soft", max_new_tokens=10)
    assert succeeds(*args, "--stream") == generation.text + "\n"
    tokens = [json.loads(line) for line in succeeds(*args, "--stream", "--json").splitlines()]
    assert [t["id"] for t in tokens] == generation.token_ids
    assert [t["generation"] for t in tokens[:-1]] == [None] * 9
    assert tokens[-1]["generation"]["text"] == generation.text


def test_generate_stream_prints_tokens_before_the_generation_ends(server: Server):
    command = [ADAPTERD, "generate", PROMPT, "--stream", "--max-new-tokens", "3000", "--url", server.url]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        first = process.stdout.read1(1024)  # type: ignore[attr-defined]
        assert first and process.poll() is None, "nothing printed while generating"
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_generate_chat_and_sampling_flags(server: Server):
    with Client(server.url) as client:
        chat = client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=6)
        sampled = client.generate(
            PROMPT, max_new_tokens=6, temperature=1.2, top_k=40, top_p=0.9, seed=3, stop=["\n\n"]
        )
    url = ("--url", server.url)
    assert succeeds("generate", "Hi", "--chat", "--max-new-tokens", "6", *url) == chat.text + "\n"
    flags = ("--temperature", "1.2", "--top-k", "40", "--top-p", "0.9", "--seed", "3", "--stop", "\n\n")
    assert (
        json.loads(succeeds("generate", PROMPT, "--max-new-tokens", "6", *flags, *url, "--json"))["text"]
        == sampled.text
    )


def test_generate_structured_output_and_the_newer_sampling_flags(server: Server):
    url = ("--url", server.url)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    text = succeeds("generate", PROMPT, "--json-schema", json.dumps(schema), "--max-new-tokens", "32", *url)
    assert json.loads(text) in ({"ok": True}, {"ok": False})
    assert succeeds("generate", PROMPT, "--choice", "up", "--choice", "down", *url).strip() in ("up", "down")
    assert re.fullmatch(r"[0-9]{3}\n", succeeds("generate", PROMPT, "--regex", "[0-9]{3}", *url))
    with Client(server.url) as client:
        first = client.generate(PROMPT, max_new_tokens=1).token_ids[0]  # type: ignore[index]
    flags = ("--logit-bias", f"{first}=100", "--stop-token-id", str(first), "--min-tokens", "2")
    out = json.loads(succeeds("generate", PROMPT, "--max-new-tokens", "6", *flags, *url, "--json"))
    assert (
        out["token_ids"][-1] == first and first not in out["token_ids"][:2] and out["finish_reason"] == "stop"
    )
    both = adapterd("generate", PROMPT, "--regex", "a", "--grammar", "b", *url)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr  # argparse's usage error


# -- errors, URL and keys ---------------------------------------------------------------------------------


def test_errors_are_one_line_and_exit_status_1(server: Server, tmp_path: Path):
    url = ("--url", server.url)
    assert fails("generate", PROMPT, "--adapter", "nope", *url) == (
        "adapterd: error: AdapterNotFound: adapter 'nope' is not registered"
    )
    assert "InvalidRequest: temperature must be >= 0" in fails(
        "generate", PROMPT, "--temperature", "-1", *url
    )
    assert "InvalidRequest" in fails("generate", PROMPT, "--stream", "--max-new-tokens", "0", *url)
    assert "is not a PEFT adapter directory" in fails("adapters", "upload", "x", str(tmp_path), *url)
    missing = tmp_path / "no-such-dir"
    assert fails("adapters", "upload", "x", str(missing), *url) == (
        f"adapterd: error: {missing}: no such file or directory"
    )


def test_upload_takes_a_tar_and_says_why_pickle_weights_are_not_enough(
    server: Server, adapter_dirs: dict[str, Path], tmp_path: Path
):
    url = ("--url", server.url)
    archive = tmp_path / "lora.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(adapter_dirs["lora"], arcname="my-lora")  # the directory, as `tar czf` makes it
    uploaded = json.loads(succeeds("adapters", "upload", "from-tar", str(archive), "--json", *url))
    with Client(server.url) as client:
        assert client.get_adapter("from-tar").sha256 == uploaded["sha256"]
        direct = client.upload_adapter("from-dir", adapter_dirs["lora"])
    assert uploaded["sha256"] == direct.sha256 and uploaded["type"] == "lora"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter_dirs["lora"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    refused = fails("adapters", "upload", "pickled", str(pickled), *url)
    assert "adapter_model.bin but no adapter_model.safetensors: pickle weights are refused" in refused
    not_a_tar = tmp_path / "notes.txt"
    not_a_tar.write_text("hello")
    assert "neither a PEFT adapter directory nor a tar archive" in fails(
        "adapters", "upload", "x", str(not_a_tar), *url
    )
    dead = f"http://127.0.0.1:{free_port()}"
    assert fails("adapters", "list", "--url", dead).startswith(
        f"adapterd: error: ConnectionFailed: cannot reach the server at {dead}"
    )


def test_url_flag_wins_over_adapterd_url(server: Server, uploaded: dict[str, str]):
    assert "lora" in succeeds("adapters", "list", env={"ADAPTERD_URL": server.url})
    dead = f"http://127.0.0.1:{free_port()}"
    assert "lora" in succeeds("adapters", "list", "--url", server.url, env={"ADAPTERD_URL": dead})
    assert "ConnectionFailed" in fails("adapters", "list", env={"ADAPTERD_URL": dead})


def test_api_key_from_adapterd_api_key_or_the_flag(keyed_server: Server, adapter_dirs: dict[str, Path]):
    url = {"ADAPTERD_URL": keyed_server.url}
    assert "Unauthorized" in fails("adapters", "list", env=url)
    assert "Unauthorized" in fails("adapters", "list", env={**url, "ADAPTERD_API_KEY": "wrongkey"})
    assert succeeds("adapters", "list", env={**url, "ADAPTERD_API_KEY": "userkey"}) == "no adapters\n"
    upload = ("adapters", "upload", "lora", str(adapter_dirs["lora"]))
    assert "PermissionDenied" in fails(*upload, env={**url, "ADAPTERD_API_KEY": "userkey"})
    assert succeeds(*upload, "--api-key", "adminkey", env={**url, "ADAPTERD_API_KEY": "userkey"}).startswith(
        "uploaded lora"
    )
    assert succeeds(
        "generate",
        PROMPT,
        "--adapter",
        "lora",
        "--max-new-tokens",
        "3",
        env={**url, "ADAPTERD_API_KEY": "userkey"},
    )


# -- train (what needs no trainer) ------------------------------------------------------------------------


def test_train_commands_need_a_config_and_say_when_the_trainer_is_unreachable(tmp_path: Path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "Hi", "completion": " Hello"}\n')
    submit = adapterd("train", "submit", "--data", str(data), "--method", "lora")
    assert submit.returncode == 2 and "adapter_id" in submit.stderr
    dead = f"http://127.0.0.1:{free_port()}"
    assert fails("train", "list", env={"ADAPTERD_TRAINER_URL": dead}).startswith(
        f"adapterd: error: ConnectionFailed: cannot reach the server at {dead}"
    )
    assert "ConnectionFailed" in fails(
        "train", "submit", "--data", str(data), "--adapter-id", "a", "--method", "lora", "--url", dead
    )
    assert "no such file" in fails(
        "train",
        "submit",
        "--data",
        str(tmp_path / "missing.jsonl"),
        "--adapter-id",
        "a",
        "--method",
        "lora",
        "--url",
        dead,
    )
