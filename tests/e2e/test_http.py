"""The HTTP server, as a real process on a loopback port: every generation route answers PEFT's greedy
tokens for uploaded adapters; uploads, limits, errors, streaming and cancellation behave as users expect."""

from __future__ import annotations

import io
import json
import re
import tarfile
import threading
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from adapterd.server.model.resolve import ResolvedModel
from adapterd.server.model.tokenizer import encode_chat
from tests.e2e.serving import Server, make_tiny_chat_model, running_server
from tests.reference import (
    greedy_forward,
    greedy_generate,
    load_base,
    load_peft,
    make_lora_adapter,
    make_prompt_adapter,
)

PROMPT = "The quick brown fox"
NEW_TOKENS = 12
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def model(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), default_model.path)


@pytest.fixture(scope="module")
def adapters(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("http-adapters")
    made = {
        f"lora{i}": make_lora_adapter(
            model,
            root / f"lora{i}",
            r=4 * (i + 1),
            alpha=8,
            seed=i,
            target_modules="all-linear" if i % 2 else ["q_proj", "v_proj"],
        )
        for i in range(6)
    }
    made["soft"] = make_prompt_adapter(model, root / "soft", num_virtual_tokens=8, seed=7)
    return made


@pytest.fixture(scope="module")
def tokenizer(model: Path):
    return AutoTokenizer.from_pretrained(model)


@pytest.fixture(scope="module")
def expected(model: Path, adapters: dict[str, Path], tokenizer) -> dict[str | None, list[int]]:
    """PEFT's greedy tokens for PROMPT: generate() for LoRA and the base, forward passes for the soft prompt."""
    ids, eos = tokenizer(PROMPT).input_ids, tokenizer.eos_token_id
    refs: dict[str | None, list[int]] = {None: greedy_generate(load_base(model), ids, NEW_TOKENS, eos)}
    for name, path in adapters.items():
        decode = greedy_forward if name == "soft" else greedy_generate
        refs[name] = decode(load_peft(model, path), ids, NEW_TOKENS, eos)
    return refs


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("http-server")
    with running_server(
        model,
        root / "store",
        root / "server.log",
        "--max-rank",
        "32",
        "--max-gpu-adapters",
        "4",
        "--kv-cache-tokens",
        "4096",
    ) as running:
        yield running


def upload_multipart(server: Server, adapter_id: str, path: Path) -> httpx.Response:
    files = {name: (name, (path / name).read_bytes()) for name in FILES}
    return httpx.put(f"{server.url}/v1/adapters/{adapter_id}", files=files, timeout=60)


def tar_of(path: Path, gz: bool = True, arcname: str = "adapter") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as archive:
        archive.add(path, arcname=arcname)
    return buffer.getvalue()


def upload_tar(server: Server, adapter_id: str, body: bytes) -> httpx.Response:
    return httpx.put(
        f"{server.url}/v1/adapters/{adapter_id}",
        content=body,
        timeout=60,
        headers={"content-type": "application/x-tar"},
    )


def tgi(server: Server, adapter: str | None, path: str = "/generate", **extra: object) -> httpx.Response:
    parameters = {"adapter_id": adapter, "max_new_tokens": NEW_TOKENS, "details": True}
    return httpx.post(
        f"{server.url}{path}", json={"inputs": PROMPT, "parameters": parameters, **extra}, timeout=60
    )


def sse_events(response: httpx.Response) -> list:
    return [
        json.loads(line[6:])
        for line in response.iter_lines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


@pytest.fixture(scope="module")
def uploaded(server: Server, adapters: dict[str, Path]) -> dict[str, Path]:
    assert upload_multipart(server, "lora0", adapters["lora0"]).status_code == 201
    assert upload_tar(server, "soft", tar_of(adapters["soft"])).status_code == 201
    for name in ("lora1", "lora2", "lora3", "lora4", "lora5"):
        assert upload_tar(server, name, tar_of(adapters[name], gz=False, arcname=".")).status_code == 201
    return adapters


@pytest.mark.parametrize("adapter", [None, "lora0", "soft"])
def test_every_generation_route_answers_pefts_tokens(server: Server, uploaded, expected, tokenizer, adapter):
    want_ids = expected[adapter]
    want_text = tokenizer.decode(want_ids, skip_special_tokens=True)
    model = adapter or server_model_name(server)

    details = tgi(server, adapter).json()["details"]
    assert [t["id"] for t in details["tokens"]] == want_ids
    root = httpx.post(
        f"{server.url}/",
        json={"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": NEW_TOKENS}},
        timeout=60,
    ).json()
    assert root[0]["generated_text"] == want_text
    with httpx.stream(
        "POST",
        f"{server.url}/generate_stream",
        json={"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": NEW_TOKENS}},
        timeout=60,
    ) as response:
        events = sse_events(response)
    assert [e["token"]["id"] for e in events] == want_ids
    assert events[-1]["generated_text"] == want_text
    with httpx.stream(
        "POST",
        f"{server.url}/",
        json={
            "inputs": PROMPT,
            "stream": True,
            "parameters": {"adapter_id": adapter, "max_new_tokens": NEW_TOKENS},
        },
        timeout=60,
    ) as response:
        assert [e["token"]["id"] for e in sse_events(response)] == want_ids

    completion = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0},
        timeout=60,
    ).json()
    assert completion["choices"][0]["text"] == want_text
    assert completion["usage"]["completion_tokens"] == len(want_ids)
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True},
        timeout=60,
    ) as response:
        assert "".join(c["choices"][0]["text"] for c in sse_events(response)) == want_text


@pytest.mark.parametrize("adapter", [None, "lora0", "soft"])
def test_chat_routes_answer_pefts_tokens(server: Server, uploaded, model: Path, tokenizer, adapter):
    """/v1/chat/completions, plain and streamed: the chat template applied exactly as PEFT's input."""
    messages = [{"role": "user", "content": "Tell me a story."}]
    ids = encode_chat(tokenizer, messages)
    peft = load_base(model) if adapter is None else load_peft(model, uploaded[adapter])
    decode = greedy_forward if adapter == "soft" else greedy_generate
    want = tokenizer.decode(decode(peft, ids, NEW_TOKENS, tokenizer.eos_token_id), skip_special_tokens=True)
    body = {
        "model": adapter or server_model_name(server),
        "messages": messages,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
    }
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert reply["choices"][0]["message"]["content"] == want
    assert reply["usage"]["prompt_tokens"] == len(ids)
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as response:
        chunks = sse_events(response)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == want


SYSTEM_PROMPT = "You are a careful assistant for a shipping company. " * 8


def test_a_shared_system_prompt_comes_from_the_prefix_cache_of_its_own_model(
    server: Server, uploaded, model: Path, tokenizer
):
    """Two chats with one long system prompt, per model: the second takes the system prompt's blocks from
    the cache (/metrics counts it), the first of each model takes none of another model's, and both answer
    PEFT's tokens."""
    for adapter in ("lora1", "soft", None):
        peft = load_base(model) if adapter is None else load_peft(model, uploaded[adapter])
        decode = greedy_forward if adapter == "soft" else greedy_generate
        for turn, question in enumerate(("Where is my parcel?", "Can I change the address?")):
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
            ids = encode_chat(tokenizer, messages)
            want = tokenizer.decode(
                decode(peft, ids, NEW_TOKENS, tokenizer.eos_token_id), skip_special_tokens=True
            )
            before = metric(httpx.get(f"{server.url}/metrics").text, "adapterd_prefix_cache_hits_total")
            body = {
                "model": adapter or server_model_name(server),
                "messages": messages,
                "max_tokens": NEW_TOKENS,
            }
            reply = httpx.post(
                f"{server.url}/v1/chat/completions", json={**body, "temperature": 0}, timeout=60
            )
            assert reply.json()["choices"][0]["message"]["content"] == want, (adapter, turn)
            hits = (
                metric(httpx.get(f"{server.url}/metrics").text, "adapterd_prefix_cache_hits_total") - before
            )
            assert (hits >= 64) if turn else (hits == 0), (adapter, turn, hits)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric(metrics, "adapterd_prefix_cache_blocks") > 0
    assert 0 < metric(metrics, "adapterd_prefix_cache_hit_rate") < 1


def server_model_name(server: Server) -> str:
    return httpx.get(f"{server.url}/info").json()["model_id"]


def test_openai_package_chat_and_completions(server: Server, uploaded, tokenizer, model: Path):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Say something."}]
    chat_ids = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    ).input_ids
    want = tokenizer.decode(
        greedy_generate(load_peft(model, uploaded["lora0"]), chat_ids, NEW_TOKENS, tokenizer.eos_token_id),
        skip_special_tokens=True,
    )
    reply = client.chat.completions.create(
        model="lora0", messages=messages, max_tokens=NEW_TOKENS, temperature=0
    )
    assert reply.choices[0].message.content == want
    stream = client.chat.completions.create(
        model="lora0",
        messages=messages,
        max_tokens=NEW_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(chat_ids)
    text = (
        client.completions.create(model="lora0", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    )
    assert isinstance(text, str) and text
    models = {m.id: m for m in client.models.list()}
    assert {"lora0", "soft"} <= set(models)
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)


def test_sixteen_concurrent_streams_while_adapters_come_and_go(server: Server, uploaded, expected, adapters):
    names = [None, "lora0", "lora1", "lora2", "lora3", "lora4", "lora5", "soft"]
    results: dict[int, list[int]] = {}

    def stream(i: int) -> None:
        adapter = names[i % len(names)]
        with httpx.stream(
            "POST",
            f"{server.url}/generate_stream",
            timeout=120,
            json={"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": NEW_TOKENS}},
        ) as r:
            results[i] = [e["token"]["id"] for e in sse_events(r)]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for round_ in range(3):  # churn: other adapters uploaded and deleted meanwhile
        assert upload_multipart(server, f"churn{round_}", adapters["lora3"]).status_code == 201
        assert httpx.delete(f"{server.url}/v1/adapters/churn{round_}", timeout=30).status_code == 200
    for t in threads:
        t.join(timeout=180)
    assert sorted(results) == list(range(16))
    for i, ids in results.items():
        assert ids == expected[names[i % len(names)]], f"stream {i} ({names[i % len(names)]})"


def test_few_gpu_slots_rotate_six_adapters_and_metrics_count_it(
    model: Path, adapters, expected, tmp_path: Path
):
    with running_server(
        model,
        tmp_path / "store",
        tmp_path / "log",
        "--max-rank",
        "32",
        "--max-gpu-adapters",
        "2",
        "--max-cpu-adapters",
        "3",
    ) as server:
        for i in range(6):
            assert upload_multipart(server, f"lora{i}", adapters[f"lora{i}"]).status_code == 201
        for _round in range(2):
            for i in range(6):
                details = tgi(server, f"lora{i}").json()["details"]
                assert [t["id"] for t in details["tokens"]] == expected[f"lora{i}"]
        metrics = httpx.get(f"{server.url}/metrics").text
    assert metric(metrics, 'adapterd_adapter_loads_total{tier="gpu"}') >= 12
    assert metric(metrics, 'adapterd_adapter_evictions_total{tier="gpu"}') >= 10
    assert metric(metrics, 'adapterd_adapter_evictions_total{tier="cpu"}') >= 9
    assert metric(metrics, 'adapterd_requests_total{adapter="lora3"}') == 2


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))
