"""The registry over HTTP: malformed uploads refused with a named problem and nothing changed, kill -9
during uploads, replacing and deleting adapters that running requests use, limits, keys and tenants."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from adapterd.server.model.resolve import ResolvedModel
from tests.e2e.serving import Server, make_tiny_chat_model, running_server, start_server
from tests.e2e.test_http import FILES, sse_events, tar_of, upload_multipart, upload_tar
from tests.reference import (
    make_ia3_adapter,
    make_lora_adapter,
    make_p_tuning_adapter,
    make_prefix_adapter,
    make_prompt_adapter,
)


@pytest.fixture(scope="module")
def model(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-registry"), default_model.path)


@pytest.fixture(scope="module")
def lora(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(
        model, tmp_path_factory.mktemp("lora") / "a", r=8, alpha=16, target_modules="all-linear"
    )


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("registry-server")
    with running_server(
        model,
        root / "store",
        root / "log",
        "--max-rank",
        "16",
        "--max-upload-bytes",
        str(8 * 1024**2),
        "--max-pending",
        "2",
        "--allowed-lora-dir",
        str(root),
    ) as running:
        running.root = root  # type: ignore[attr-defined]
        yield running


def listing(server: Server) -> list[dict]:
    return httpx.get(f"{server.url}/v1/adapters").json()["data"]


def variant(
    source: Path,
    dest: Path,
    config: dict | None = None,
    tensors: dict | None = None,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A copy of `source` with config keys overridden, tensors replaced, or extra files added."""
    dest.mkdir(parents=True)
    cfg = json.loads((source / FILES[0]).read_text())
    (dest / FILES[0]).write_text(json.dumps({**cfg, **(config or {})}))
    weights = load_file(source / FILES[1])
    save_file({**weights, **(tensors or {})}, dest / FILES[1])
    for name, data in (extra or {}).items():
        (dest / name).write_bytes(data)
    return dest


def raw_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def test_malformed_uploads_get_a_4xx_naming_the_problem_and_change_nothing(
    server: Server, lora: Path, tmp_path: Path
):
    assert upload_multipart(server, "good", lora).status_code == 201
    before = listing(server)
    import torch

    a_key = next(k for k in load_file(lora / FILES[1]) if "lora_A" in k)
    cases = {
        "no DoRA magnitude vector": upload_multipart(
            server, "bad1", variant(lora, tmp_path / "dora", {"use_dora": True})
        ),
        "modules_to_save": upload_multipart(
            server, "bad2", variant(lora, tmp_path / "mts", {"modules_to_save": ["lm_head"]})
        ),
        "r": upload_multipart(server, "bad3", variant(lora, tmp_path / "rank", {"r": 64})),
        "NaN": upload_multipart(
            server,
            "bad4",
            variant(lora, tmp_path / "nan", tensors={a_key: torch.full((8, 64), float("nan"))}),
        ),
        "LOHA": upload_multipart(server, "bad5", variant(lora, tmp_path / "loha", {"peft_type": "LOHA"})),
        "ia3_l": upload_multipart(server, "bad12", variant(lora, tmp_path / "ia3", {"peft_type": "IA3"})),
        "bin": httpx.put(
            f"{server.url}/v1/adapters/bad6",
            timeout=60,
            files={
                name: (name, b"x" if name.endswith(".bin") else (lora / name).read_bytes())
                for name in (*FILES, "adapter_model.bin")
            },
        ),
        "outside": upload_tar(server, "bad7", raw_tar([member("../adapter_config.json")])),
        "link": upload_tar(
            server, "bad8", raw_tar([member("adapter_config.json", kind=tarfile.SYMTYPE, link="/etc/passwd")])
        ),
        "not a readable tar": upload_tar(server, "bad9", b"this is no archive"),
        "limit": upload_tar(server, "bad10", b"\0" * (9 * 1024**2)),
        "invalid adapter id": upload_multipart(server, ".hidden", lora),
        "adapter_model.bin": upload_tar(
            server, "bad11", tar_of(variant(lora, tmp_path / "pkl2", extra={"adapter_model.bin": b"x"}))
        ),
    }
    for needle, response in cases.items():
        assert 400 <= response.status_code < 500, (needle, response.status_code, response.text)
        assert needle in response.json()["error"]["message"], (needle, response.text)
    assert listing(server) == before


def upload_with_metadata(
    server: Server,
    adapter_id: str,
    path: Path,
    metadata: str | None = None,
    metadata_file: bytes | None = None,
) -> httpx.Response:
    """A multipart upload with a `metadata` text field (as `curl -F 'metadata={...}'`), or a `metadata`
    file part (as `curl -F metadata=@meta.json`)."""
    files = {name: (name, (path / name).read_bytes()) for name in FILES}
    if metadata_file is not None:
        files["metadata"] = ("meta.json", metadata_file)
    data = {"metadata": metadata} if metadata is not None else None
    return httpx.put(f"{server.url}/v1/adapters/{adapter_id}", data=data, files=files, timeout=60)


def test_multipart_metadata_is_stored_and_bad_metadata_changes_nothing(server: Server, lora: Path):
    metadata = {"job_id": "job-1", "base_model": "tiny", "metrics": {"exact_match": 0.5}, "tags": ["a", "é"]}
    created = upload_with_metadata(server, "with-meta", lora, json.dumps(metadata))
    assert created.status_code == 201, created.text
    assert created.json()["metadata"] == metadata
    assert httpx.get(f"{server.url}/v1/adapters/with-meta").json()["metadata"] == metadata
    assert next(a for a in listing(server) if a["id"] == "with-meta")["metadata"] == metadata
    replaced = upload_with_metadata(server, "with-meta", lora, metadata_file=b'{"version": 2}')
    assert replaced.status_code == 200 and replaced.json()["version"] == 2
    assert httpx.get(f"{server.url}/v1/adapters/with-meta").json()["metadata"] == {"version": 2}
    assert upload_multipart(server, "no-meta", lora).json()["metadata"] == {}

    before = listing(server)
    limit = 64 * 1024
    cases = [
        ("not valid JSON", {"metadata": "{job_id: 1}"}),
        ("must be a JSON object, not an array", {"metadata": json.dumps([metadata])}),
        ("must be a JSON object, not a string", {"metadata": '"job-1"'}),
        ("not valid JSON (NaN is not a JSON value", {"metadata": '{"loss": NaN}'}),
        (f"exceeds the {limit}-byte limit", {"metadata": json.dumps({"pad": "x" * limit})}),
        (f"exceeds the {limit}-byte limit", {"metadata_file": json.dumps({"pad": "x" * limit}).encode()}),
        ("not UTF-8", {"metadata_file": b'{"name": "\xff"}'}),
    ]
    for needle, metadata_args in cases:
        response = upload_with_metadata(server, "bad-meta", lora, **metadata_args)  # type: ignore[arg-type]
        assert response.status_code == 400, (needle, response.status_code, response.text)
        message = response.json()["error"]["message"]
        assert message.startswith("metadata: ") and needle in message, (needle, message)
    in_query = httpx.put(
        f"{server.url}/v1/adapters/bad-meta",
        params={"metadata": "{}"},
        content=tar_of(lora),
        headers={"content-type": "application/x-tar"},
        timeout=60,
    )
    assert in_query.status_code == 400 and "tar uploads carry no metadata" in in_query.text
    assert listing(server) == before
    assert httpx.get(f"{server.url}/v1/adapters/bad-meta").status_code == 404


def test_adapter_for_another_base_model_is_refused(
    server: Server, tmp_path: Path, default_model: ResolvedModel
):
    other = make_lora_adapter(
        default_model.path, tmp_path / "smollm", r=4, alpha=8, target_modules=["q_proj"]
    )
    response = upload_multipart(server, "wrong-base", other)
    assert response.status_code == 422 and "shape" in response.json()["error"]["message"]


def test_replacing_an_adapter_keeps_running_requests_on_their_version(
    server: Server, lora: Path, model: Path, tmp_path: Path
):
    second = make_lora_adapter(model, tmp_path / "v2", r=8, alpha=16, target_modules="all-linear", seed=5)
    assert upload_multipart(server, "swap", lora).status_code in (200, 201)
    params = {"adapter_id": "swap", "max_new_tokens": 48, "details": True}
    solo = httpx.post(
        f"{server.url}/generate", json={"inputs": "Once", "parameters": params}, timeout=60
    ).json()
    with httpx.stream(
        "POST", f"{server.url}/generate_stream", timeout=60, json={"inputs": "Once", "parameters": params}
    ) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        replaced = upload_multipart(server, "swap", second)  # mid-stream
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert replaced.status_code == 200 and replaced.json()["version"] == 2
    streamed = [json.loads(first[6:])["token"]["id"]] + [e["token"]["id"] for e in rest]
    assert streamed == [t["id"] for t in solo["details"]["tokens"]]
    after = httpx.post(
        f"{server.url}/generate", json={"inputs": "Once", "parameters": params}, timeout=60
    ).json()
    assert after["details"]["tokens"] != solo["details"]["tokens"]


def test_deleting_an_adapter_in_use_lets_running_requests_finish(server: Server, lora: Path):
    assert upload_multipart(server, "doomed", lora).status_code == 201
    params = {"adapter_id": "doomed", "max_new_tokens": 40}
    with httpx.stream(
        "POST", f"{server.url}/generate_stream", timeout=60, json={"inputs": "Once", "parameters": params}
    ) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert httpx.delete(f"{server.url}/v1/adapters/doomed", timeout=30).status_code == 200
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert events[-1]["details"]["generated_tokens"] == 40
    gone = httpx.post(f"{server.url}/generate", json={"inputs": "Once", "parameters": params}, timeout=30)
    assert gone.status_code == 404 and gone.json()["error_type"] == "adapter_not_found"


def test_bad_generation_input_is_a_4xx_never_a_500(server: Server):
    cases = [
        ("/generate", {"inputs": "x", "parameters": {"temperature": -1}}, "temperature"),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": "ten"}}, "max_new_tokens"),
        ("/generate", {"parameters": {}}, "inputs"),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 10**6}}, "limit"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, "nope"),
        ("/v1/chat/completions", {"model": "x", "messages": "hi"}, "messages"),
        ("/v1/completions", {"prompt": "x"}, "model"),
        ("/v1/completions", {"model": "x", "prompt": "x", "n": 0}, "n must be in 1..128"),
    ]
    for path, body, needle in cases:
        response = httpx.post(f"{server.url}{path}", json=body, timeout=30)
        assert 400 <= response.status_code < 500, (path, body, response.text)
        error = response.json()["error"]
        assert needle in (error if isinstance(error, str) else error["message"]), response.text
    broken = httpx.post(f"{server.url}/generate", content=b"{not json", timeout=30)
    assert broken.status_code == 400 and broken.json()["error_type"] == "validation"  # TGI's name


def test_a_client_that_disconnects_is_cancelled_and_a_full_queue_answers_429(server: Server):
    body = {"inputs": "Once", "parameters": {"max_new_tokens": 4000}}  # seconds of work on the tiny model
    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=60) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 10  # the engine drops the sequence within a step of noticing
    while metric_value(server, "adapterd_running_batch_size") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric_value(server, "adapterd_running_batch_size") == 0
    tokens_then = metric_value(server, "adapterd_generated_tokens_total")
    time.sleep(0.5)
    assert metric_value(server, "adapterd_generated_tokens_total") == tokens_then

    streams = [httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=60) for _ in range(2)]
    opened = [s.__enter__() for s in streams]  # --max-pending 2: both admitted
    try:
        overloaded = httpx.post(f"{server.url}/generate", json=body, timeout=30)
        assert overloaded.status_code == 429 and overloaded.json()["error_type"] == "overloaded"
    finally:
        for s, r in zip(streams, opened, strict=True):
            r.close()
            s.__exit__(None, None, None)


def metric_value(server: Server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing")


def test_vllm_load_and_unload_only_from_allowed_dirs(server: Server, lora: Path, tmp_path: Path):
    allowed = server.root / "vllm-lora"  # type: ignore[attr-defined]
    variant(lora, allowed)
    loaded = httpx.post(
        f"{server.url}/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(allowed)}
    )
    assert loaded.status_code == 200 and loaded.json()["id"] == "vl"
    outside = httpx.post(
        f"{server.url}/v1/load_lora_adapter", json={"lora_name": "v2", "lora_path": str(lora)}
    )
    assert (
        outside.status_code == 403 and "not under a directory allowed" in outside.json()["error"]["message"]
    )
    assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "vl"}).status_code == 200
    assert httpx.get(f"{server.url}/v1/adapters/vl").status_code == 404


def test_keys_roles_and_tenants(model: Path, lora: Path, tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("adminkey admin\nuserkey user\nacmekey user acme\nacmeadmin admin acme\n")
    with running_server(model, tmp_path / "store", tmp_path / "log", "--api-keys", str(keys)) as server:

        def call(method: str, path: str, key: str | None, **kw: object) -> httpx.Response:
            headers = {"authorization": f"Bearer {key}"} if key else {}
            return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=60, **kw)

        files = {name: (name, (lora / name).read_bytes()) for name in FILES}
        assert call("PUT", "/v1/adapters/public", None, files=files).status_code == 401
        assert call("PUT", "/v1/adapters/public", "wrong", files=files).status_code == 401
        assert call("PUT", "/v1/adapters/public", "userkey", files=files).status_code == 403
        assert call("PUT", "/v1/adapters/public", "adminkey", files=files).status_code == 201
        assert call("PUT", "/v1/adapters/other/x", "adminkey", files=files).status_code == 201
        assert call("PUT", "/v1/adapters/other/y", "acmeadmin", files=files).status_code == 403
        assert call("PUT", "/v1/adapters/acme/mine", "acmeadmin", files=files).status_code == 201
        seen = {a["id"] for a in call("GET", "/v1/adapters", "acmekey").json()["data"]}
        assert seen == {"public", "acme/mine"}
        generate = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "adapter_id": "other/x"}}
        assert call("POST", "/generate", "acmekey", json=generate).status_code == 404
        assert call("POST", "/generate", "userkey", json=generate).status_code == 200
        assert call("DELETE", "/v1/adapters/public", "userkey").status_code == 403
        assert call("GET", "/health", None).status_code == 200


KILLER = """
import sys, httpx
url, tar_path = sys.argv[1], sys.argv[2]
body = open(tar_path, "rb").read()
for i in range(10**6):
    httpx.put(f"{url}/v1/adapters/churn", content=body, headers={"content-type": "application/x-tar"}, timeout=30)
"""


def test_kill_9_during_uploads_leaves_a_consistent_store(model: Path, lora: Path, tmp_path: Path):
    store = tmp_path / "store"
    big_tar = tmp_path / "adapter.tar"
    big_tar.write_bytes(tar_of(lora))
    server = start_server(model, store, tmp_path / "log1")
    try:
        for name in ("keep1", "keep2"):
            assert upload_multipart(server, name, lora).status_code == 201
        uploader = subprocess.Popen([sys.executable, "-c", KILLER, server.url, str(big_tar)])
        time.sleep(random.uniform(0.5, 1.5))
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        uploader.kill()
        uploader.wait(timeout=10)
    finally:
        server.stop(sig_kill=True)
    with running_server(model, store, tmp_path / "log2") as restarted:
        ids = {a["id"]: a for a in listing(restarted)}
        assert {"keep1", "keep2"} <= set(ids)
        for adapter_id in ids:
            response = httpx.post(
                f"{restarted.url}/generate",
                timeout=60,
                json={"inputs": "Hi", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 3}},
            )
            assert response.status_code == 200, response.text
        staging = store / "tmp"  # uploads in flight and versions being written: cleaned on restart
        assert not staging.exists() or not any(staging.iterdir())


def test_prompt_tuning_upload_serves_with_events_in_order(server: Server, model: Path, tmp_path: Path):
    soft = make_prompt_adapter(model, tmp_path / "soft", num_virtual_tokens=6, seed=3)
    assert upload_tar(server, "soft6", tar_of(soft, gz=False)).status_code == 201
    with httpx.stream(
        "POST",
        f"{server.url}/generate_stream",
        timeout=60,
        json={"inputs": "Hi", "parameters": {"adapter_id": "soft6", "max_new_tokens": 5}},
    ) as r:
        events = sse_events(r)
    assert len(events) == 5 and events[-1]["details"]["generated_tokens"] == 5
    assert all(e["generated_text"] is None for e in events[:-1])


def test_every_adapter_kind_uploads_and_serves_and_its_malformed_variants_change_nothing(
    server: Server, model: Path, tmp_path: Path
):
    import torch

    made = {
        "dora": make_lora_adapter(
            model, tmp_path / "dora", r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True
        ),
        "ia3": make_ia3_adapter(model, tmp_path / "ia3"),
        "prefix_tuning": make_prefix_adapter(model, tmp_path / "prefix", num_virtual_tokens=5),
        "p_tuning": make_p_tuning_adapter(model, tmp_path / "ptune", num_virtual_tokens=4),
    }
    weights = {kind: load_file(path / FILES[1]) for kind, path in made.items()}
    magnitude = next(k for k in weights["dora"] if "magnitude" in k)
    ia3_key = next(k for k in weights["ia3"] if "k_proj" in k)
    prompt = weights["prefix_tuning"]["prompt_embeddings"]
    bad = {  # kind: (variant, what the refusal names)
        "dora": (variant(made["dora"], tmp_path / "d1", tensors={magnitude: torch.ones(7)}), magnitude),
        "ia3": (
            variant(made["ia3"], tmp_path / "i1", tensors={ia3_key: torch.full((64, 1), float("nan"))}),
            "NaN",
        ),
        "prefix_tuning": (
            variant(
                made["prefix_tuning"], tmp_path / "p1", tensors={"prompt_embeddings": prompt[:, :-1].clone()}
            ),
            "layers x 2 x KV heads",
        ),
        "p_tuning": (
            variant(made["p_tuning"], tmp_path / "t1", {"num_virtual_tokens": 0}),
            "num_virtual_tokens",
        ),
    }
    before = listing(server)
    for kind, (path, needle) in bad.items():
        response = upload_multipart(server, f"bad-{kind.replace('_', '-')}", path)
        assert 400 <= response.status_code < 500 and needle in response.json()["error"]["message"], (
            response.text
        )
    assert listing(server) == before
    for kind, path in made.items():
        adapter_id = f"kind-{kind.replace('_', '-')}"
        assert upload_multipart(server, adapter_id, path).status_code == 201
        [description] = [a for a in listing(server) if a["id"] == adapter_id]
        assert description["type"] == kind
        reply = httpx.post(
            f"{server.url}/generate",
            timeout=60,
            json={"inputs": "Hi", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 4}},
        )
        assert reply.status_code == 200 and reply.json()["generated_text"], reply.text
