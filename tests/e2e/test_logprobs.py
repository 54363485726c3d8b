"""Log-probabilities on every front end, checked from first principles: each prompt and output log-probability
is log_softmax of the PEFT model's own forward pass at that position (prompt tuning: PEFT's forward, with the
virtual tokens in front), and each top-k list is the true top k, best first. Plus n, the tokenizer routes and
the refusals of bad input, each naming its field."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import grpc
import httpx
import pytest
import torch

from adapterd.server.model.tokenizer import encode_chat
from adapterd.v1 import generation_pb2 as pb
from adapterd.v1 import generation_pb2_grpc
from tests.e2e.conftest import NUM_VIRTUAL
from tests.e2e.serving import Server
from tests.reference import greedy_forward, next_token_logprobs

ADAPTERS = ("", "lora", "soft")
PROMPT = "The three primary colours are red, yellow and"
NEW_TOKENS = 4
TOL = 1e-4
TOP = 5


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def model_name(server: Server, adapter: str) -> str:
    return adapter or httpx.get(server.url + "/info").json()["model_id"]


class Reference:
    """PEFT's greedy continuation of a prompt and the log-probabilities of the whole sequence."""

    def __init__(self, peft_model: Any, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> None:
        self.prompt_ids = prompt_ids
        self.generated = greedy_forward(peft_model, prompt_ids, new_tokens)
        self.ids = prompt_ids + self.generated
        self.logprobs = next_token_logprobs(peft_model, self.ids)  # row i: the token after ids[i]

    def logprob(self, position: int) -> float:
        return float(self.logprobs[position - 1, self.ids[position]])

    def top(self, position: int, k: int = TOP) -> tuple[list[int], list[float]]:
        best = torch.topk(self.logprobs[position - 1], k)
        return best.indices.tolist(), best.values.tolist()


@pytest.fixture(scope="module")
def prompt_ids(compat_tokenizer: Any) -> list[int]:
    return list(compat_tokenizer(PROMPT).input_ids)


@pytest.fixture(scope="module")
def refs(compat_peft: dict[str, Any], prompt_ids: list[int]) -> dict[str, Reference]:
    return {adapter: Reference(compat_peft[adapter], prompt_ids) for adapter in ADAPTERS}


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_completions_echo_returns_pefts_logprobs_for_prompt_and_output(
    compat_server, compat_tokenizer, refs, prompt_ids, adapter
):
    body = {"model": model_name(compat_server, adapter), "prompt": prompt_ids, "max_tokens": NEW_TOKENS}
    body |= {"temperature": 0, "echo": True, "logprobs": TOP}
    choice = post(compat_server, "/v1/completions", body).json()["choices"][0]
    ref, logprobs = refs[adapter], choice["logprobs"]
    decode = compat_tokenizer.decode
    assert logprobs["tokens"] == [decode([i]) for i in ref.ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for position in range(1, len(ref.ids)):
        assert logprobs["token_logprobs"][position] == pytest.approx(ref.logprob(position), abs=TOL)
        top_ids, top_values = ref.top(position)
        top = logprobs["top_logprobs"][position]
        assert list(top) == [decode([i]) for i in top_ids]  # the true top k, in order
        assert list(top.values()) == pytest.approx(top_values, abs=TOL)
    assert choice["text"] == decode(prompt_ids) + decode(ref.generated)
    lengths = [len(t) for t in logprobs["tokens"]]
    assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_max_tokens_zero_with_echo_scores_the_prompt_only(compat_server, refs, prompt_ids, adapter):
    body = {"model": model_name(compat_server, adapter), "prompt": [prompt_ids, prompt_ids[:3]]}
    body |= {"max_tokens": 0, "echo": True, "logprobs": 1}
    answer = post(compat_server, "/v1/completions", body).json()
    first, second = answer["choices"]
    assert (first["index"], second["index"]) == (0, 1)
    ref = refs[adapter]
    assert len(first["logprobs"]["token_logprobs"]) == len(prompt_ids)
    assert first["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [ref.logprob(p) for p in range(1, len(prompt_ids))], abs=TOL
    )
    assert second["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [ref.logprob(1), ref.logprob(2)], abs=TOL
    )
    assert answer["usage"] == {
        "prompt_tokens": len(prompt_ids) + 3,
        "completion_tokens": 0,
        "total_tokens": len(prompt_ids) + 3,
    }


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_chat_logprobs_are_pefts(compat_server, compat_peft, compat_tokenizer, adapter):
    turns = [{"role": "user", "content": "Name a colour."}]
    ref = Reference(compat_peft[adapter], encode_chat(compat_tokenizer, turns))
    body = {"model": model_name(compat_server, adapter), "messages": turns, "max_tokens": NEW_TOKENS}
    body |= {"temperature": 0, "logprobs": True, "top_logprobs": 3}
    content = post(compat_server, "/v1/chat/completions", body).json()["choices"][0]["logprobs"]["content"]
    start = len(ref.prompt_ids)
    assert [c["token"] for c in content] == [compat_tokenizer.decode([i]) for i in ref.generated]
    for offset, entry in enumerate(content):
        position = start + offset
        assert entry["logprob"] == pytest.approx(ref.logprob(position), abs=TOL)
        assert entry["bytes"] == list(entry["token"].encode())
        top_ids, top_values = ref.top(position, 3)
        assert [t["token"] for t in entry["top_logprobs"]] == [compat_tokenizer.decode([i]) for i in top_ids]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top_values, abs=TOL)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_tgi_details_prefill_and_top_tokens_are_pefts(compat_server, refs, prompt_ids, adapter):
    parameters = {"adapter_id": adapter or None, "max_new_tokens": NEW_TOKENS, "details": True}
    parameters |= {"decoder_input_details": True, "top_n_tokens": 2}
    details = post(compat_server, "/generate", {"inputs": PROMPT, "parameters": parameters}).json()["details"]
    ref = refs[adapter]
    assert [t["id"] for t in details["prefill"]] == prompt_ids
    assert details["prefill"][0]["logprob"] is None
    assert [t["logprob"] for t in details["prefill"][1:]] == pytest.approx(
        [ref.logprob(p) for p in range(1, len(prompt_ids))], abs=TOL
    )
    assert [t["id"] for t in details["tokens"]] == ref.generated
    for offset, (token, top) in enumerate(zip(details["tokens"], details["top_tokens"], strict=True)):
        position = len(prompt_ids) + offset
        assert token["logprob"] == pytest.approx(ref.logprob(position), abs=TOL)
        top_ids, top_values = ref.top(position, 2)
        assert [t["id"] for t in top] == top_ids
        assert [t["logprob"] for t in top] == pytest.approx(top_values, abs=TOL)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_grpc_carries_the_same_logprobs(compat_server, refs, prompt_ids, adapter):
    request = pb.GenerateRequest(
        prompt_ids=pb.TokenIds(ids=prompt_ids),
        adapter_id=adapter,
        parameters=pb.GenerationParameters(max_new_tokens=NEW_TOKENS, top_logprobs=2, prompt_logprobs=1),
    )
    with grpc.insecure_channel(compat_server.grpc_target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        done = stub.Generate(request, timeout=60)
        stream = list(stub.GenerateStream(request, timeout=60))
    ref = refs[adapter]
    assert list(done.token_ids) == ref.generated
    assert [p.token_id for p in done.prompt_logprobs] == prompt_ids
    assert not done.prompt_logprobs[0].HasField("logprob")
    for position in range(1, len(ref.ids)):
        score = (
            done.prompt_logprobs[position]
            if position < len(prompt_ids)
            else done.logprobs[position - len(prompt_ids)]
        )
        assert score.logprob == pytest.approx(ref.logprob(position), abs=TOL)
        top_ids, top_values = ref.top(position, 2 if position >= len(prompt_ids) else 1)
        assert [t.token_id for t in score.top] == top_ids
        assert [t.logprob for t in score.top] == pytest.approx(top_values, abs=TOL)
    tokens = [m.token for m in stream if m.HasField("token")]
    assert [t.logprob for t in tokens] == [s.logprob for s in done.logprobs]
    assert not done.HasField("seed")


def test_a_scored_prompt_and_ordinary_requests_share_a_batch(compat_server, refs, prompt_ids):
    """Requests on three models, one of them scoring its prompt, sent together: each answer is right."""

    def run(adapter: str, echo: bool) -> dict[str, Any]:
        body = {"model": model_name(compat_server, adapter), "prompt": prompt_ids, "max_tokens": NEW_TOKENS}
        body |= {"temperature": 0, "logprobs": 0, "echo": echo}
        return post(compat_server, "/v1/completions", body).json()["choices"][0]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        jobs = {(a, e): pool.submit(run, a, e) for a in ADAPTERS for e in (False, True)}
    for (adapter, echo), job in jobs.items():
        got = job.result()["logprobs"]["token_logprobs"]
        ref = refs[adapter]
        positions = range(1 if echo else len(prompt_ids), len(ref.ids))
        assert got[1 if echo else 0 :] == pytest.approx([ref.logprob(p) for p in positions], abs=TOL)


# -- n, seeds -----------------------------------------------------------------------------------------------


def test_n_choices_are_seeded_per_choice(compat_server, prompt_ids):
    body = {"model": "lora", "prompt": prompt_ids, "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3}
    many = post(compat_server, "/v1/completions", body).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    for j, choice in enumerate(many["choices"]):
        one = post(compat_server, "/v1/completions", {**body, "n": 1, "seed": 7 + j}).json()
        assert choice["text"] == one["choices"][0]["text"]
    assert len({c["text"] for c in many["choices"]}) > 1
    assert many["usage"]["completion_tokens"] == 18


def test_n_on_a_list_of_prompts_indexes_prompt_then_choice(compat_server, prompt_ids):
    body = {
        "model": "soft",
        "prompt": [prompt_ids, prompt_ids[:4]],
        "max_tokens": 3,
        "temperature": 0,
        "n": 2,
    }
    choices = post(compat_server, "/v1/completions", body).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"] == choices[1]["text"] != choices[2]["text"] == choices[3]["text"]


def test_chat_n_streams_every_choice(compat_server):
    body = {"model": "lora", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "n": 2}
    body |= {"temperature": 0, "stream": True, "logprobs": True}
    with httpx.stream("POST", compat_server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]
    scored = [c for c in chunks if c["choices"] and c["choices"][0].get("logprobs")]
    assert len(scored) == 6


# -- tokenizer routes ---------------------------------------------------------------------------------------


def test_tokenize_detokenize_and_the_limit_left_by_a_soft_prompt(compat_server, compat_tokenizer, prompt_ids):
    base = post(compat_server, "/tokenize", {"prompt": PROMPT}).json()
    soft = post(
        compat_server, "/tokenize", {"model": "soft", "prompt": PROMPT, "return_token_strs": True}
    ).json()
    assert base["tokens"] == soft["tokens"] == prompt_ids and base["count"] == len(prompt_ids)
    assert base["max_model_len"] - soft["max_model_len"] == NUM_VIRTUAL
    assert soft["token_strs"] == [compat_tokenizer.decode([i]) for i in prompt_ids]
    chat = post(compat_server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == encode_chat(compat_tokenizer, [{"role": "user", "content": "Hi"}])
    assert post(compat_server, "/detokenize", {"tokens": prompt_ids}).json() == {"prompt": PROMPT}
    info = httpx.get(compat_server.url + "/tokenizer_info").json()
    assert info["eos_token"] == compat_tokenizer.eos_token and info["chat_template"]
    assert post(compat_server, "/tokenize", {"model": "nope", "prompt": "x"}).status_code == 404


# -- bad input ----------------------------------------------------------------------------------------------

OPENAI_BAD = [
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "echo": True, "stream": True}, "echo"),
    ("/v1/completions", {"prompt": "Hi", "n": 129}, "n"),
    ("/v1/completions", {"prompt": "Hi", "n": 2, "best_of": 1}, "best_of"),
    ("/v1/completions", {"prompt": [[5, 10**9]]}, "prompt"),
    ("/v1/completions", {"prompt": [5, -1]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2},
        "top_logprobs",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), OPENAI_BAD)
def test_bad_logprob_requests_are_refused_naming_the_field(compat_server, path, body, param):
    response = post(compat_server, path, {"model": "lora", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert param in error["message"]
    assert error["param"] == param or param == "prompt"


TGI_BAD = [
    ({"top_n_tokens": -1}, "top_n_tokens"),
    ({"best_of": 2}, "best_of"),
    ({"best_of": 99, "do_sample": True}, "best_of"),
    ({"typical_p": 0.5}, "typical_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
]


@pytest.mark.parametrize(("parameters", "name"), TGI_BAD)
def test_bad_tgi_parameters_are_refused_in_tgis_shape(compat_server, parameters, name):
    response = post(compat_server, "/generate", {"inputs": "Hi", "parameters": parameters})
    assert response.status_code == 400
    assert response.json()["error_type"] == "validation" and name in response.json()["error"]


def test_decoder_input_details_cannot_stream(compat_server):
    body = {"inputs": "Hi", "parameters": {"decoder_input_details": True}}
    response = post(compat_server, "/generate_stream", body)
    assert response.status_code == 400 and "decoder_input_details" in response.json()["error"]


def test_grpc_refuses_too_many_logprobs(compat_server):
    request = pb.GenerateRequest(prompt="Hi", parameters=pb.GenerationParameters(top_logprobs=21))
    with grpc.insecure_channel(compat_server.grpc_target) as channel, pytest.raises(grpc.RpcError) as raised:
        generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=30)
    assert (
        raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_logprobs" in raised.value.details()
    )
