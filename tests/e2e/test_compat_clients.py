"""The clients users already have, unmodified, against a real `adapterd serve` on loopback: `lorax-client`
0.6.3 and `text-generation` 0.7.0 (in an environment of their own, tests/compat/tgi-clients.txt),
`huggingface_hub.InferenceClient` and the `openai` SDK. Each parses every answer with its own types, and the
greedy text is PEFT's for the base, a LoRA and a soft prompt."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import TextGenerationError, ValidationError

from tests.compat.envs import compat_env
from tests.e2e.serving import Server
from tests.reference import greedy_forward

ADAPTERS = ("", "lora", "soft")
PROMPT = "The three primary colours are"
NEW_TOKENS = 6
PROBE = Path(__file__).parents[1] / "compat" / "tgi_probe.py"
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "yellow", "blue"]},
        "shade": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["colour", "shade"],
    "additionalProperties": False,  # else a random model adds properties of its own, with endless names
}
REGEX = r"(red|yellow|blue)-[0-9]{2}"


@pytest.fixture(scope="module")
def prompt_ids(compat_tokenizer: Any) -> list[int]:
    return list(compat_tokenizer(PROMPT).input_ids)


@pytest.fixture(scope="module")
def expected(
    compat_peft: dict[str, Any], compat_tokenizer: Any, prompt_ids: list[int]
) -> dict[str, list[int]]:
    """PEFT's greedy tokens by adapter (forward passes: right for prompt tuning too)."""
    eos = compat_tokenizer.eos_token_id
    return {a: greedy_forward(compat_peft[a], prompt_ids, NEW_TOKENS, eos) for a in ADAPTERS}


@pytest.fixture(scope="module")
def tgi_results(compat_server: Server) -> dict[str, Any]:
    """What lorax-client and text-generation parsed, from one run of tests/compat/tgi_probe.py."""
    python = compat_env("tgi-clients.txt")
    args = {
        "url": compat_server.url,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "adapters": list(ADAPTERS),
        "schema": SCHEMA,
        "regex": REGEX,
        "structured_tokens": 160,
    }
    done = subprocess.run(
        [str(python), str(PROBE), json.dumps(args)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def base_name(server: Server) -> str:
    return httpx.get(server.url + "/info").json()["model_id"]


# -- lorax-client and text-generation -----------------------------------------------------------------------


def test_tgi_clients_structured_output(tgi_results):
    lorax, tg = tgi_results["lorax"], tgi_results["text_generation"]
    for generated in (lorax["structured"], tg["structured"]):
        jsonschema.validate(json.loads(generated["generated_text"]), SCHEMA)
        assert generated["details"]["finish_reason"] == "stop_sequence"  # the grammar finished
    streamed = lorax["structured_stream"]
    jsonschema.validate(json.loads(streamed[-1]["generated_text"]), SCHEMA)
    assert "".join(event["token"]["text"] for event in streamed) == streamed[-1]["generated_text"]
    assert re.fullmatch(REGEX, tg["structured_regex"]["generated_text"])
    assert tg["structured_invalid"] == "text_generation.errors.ValidationError"


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("package", ["lorax", "text_generation"])
def test_tgi_clients_generate_with_details(
    tgi_results, expected, compat_tokenizer, prompt_ids, package, adapter
):
    generated = tgi_results[package][adapter]["generate"]
    tokens = expected[adapter]
    assert generated["generated_text"] == compat_tokenizer.decode(tokens, skip_special_tokens=True)
    details = generated["details"]
    assert [t["id"] for t in details["tokens"]] == tokens
    assert details["generated_tokens"] == len(tokens)
    assert details["finish_reason"] == ("length" if len(tokens) == NEW_TOKENS else "eos_token")
    assert [t["id"] for t in details["prefill"]] == prompt_ids  # decoder_input_details
    assert details["prefill"][0]["logprob"] is None
    assert all(t["logprob"] < 0 for t in details["prefill"][1:] + details["tokens"])
    if package == "text_generation":  # top_n_tokens=2
        assert [len(top) for top in details["top_tokens"]] == [2] * len(tokens)
        assert [
            top[0]["id"] for top in details["top_tokens"]
        ] == tokens  # greedy: the chosen token is the best
    else:  # LoRAX's return_k_alternatives=2
        alternatives = [t["alternative_tokens"] for t in details["tokens"]]
        assert [a[0]["id"] for a in alternatives] == tokens and {len(a) for a in alternatives} == {2}


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("package", ["lorax", "text_generation"])
def test_tgi_clients_stream(tgi_results, expected, compat_tokenizer, package, adapter):
    events = tgi_results[package][adapter]["stream"]
    tokens = expected[adapter]
    assert [e["token"]["id"] for e in events] == tokens
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    text = compat_tokenizer.decode(tokens, skip_special_tokens=True)
    assert events[-1]["generated_text"] == text
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == text
    assert events[-1]["details"]["generated_tokens"] == len(tokens)
    if package == "text_generation":
        assert all(len(e["top_tokens"]) == 2 for e in events)


@pytest.mark.parametrize("package", ["lorax", "text_generation"])
def test_tgi_clients_parse_the_generate_stream_route(tgi_results, expected, package):
    events = tgi_results[package]["stream_route"]
    assert [e["token"]["id"] for e in events] == expected["lora"]
    assert events[-1]["details"]["finish_reason"] in ("length", "eos_token")
    texts = [e["token"]["text"] for e in tgi_results[package]["lora"]["stream"]]
    assert [e["token"]["text"] for e in events] == texts


@pytest.mark.parametrize("package", ["lorax", "text_generation"])
def test_tgi_clients_best_of_and_errors(tgi_results, package):
    result = tgi_results[package]
    details = result["best_of"]["details"]
    assert len(details["best_of_sequences"]) == 1
    best = sum(t["logprob"] for t in details["tokens"])
    other = details["best_of_sequences"][0]
    assert best >= sum(t["logprob"] for t in other["tokens"])
    assert details["seed"] is not None and other["seed"] is not None  # sampled: the seeds drawn are reported
    assert result["unknown"] == f"{package}.errors.NotFoundError"
    assert result["invalid"] == f"{package}.errors.ValidationError"


# -- huggingface_hub.InferenceClient ------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_inference_client_text_generation(compat_server, expected, compat_tokenizer, prompt_ids, adapter):
    client = InferenceClient(base_url=compat_server.url)
    tokens = expected[adapter]
    text = compat_tokenizer.decode(tokens, skip_special_tokens=True)
    aid = adapter or None
    assert client.text_generation(PROMPT, adapter_id=aid, max_new_tokens=NEW_TOKENS) == text
    out = client.text_generation(
        PROMPT,
        adapter_id=aid,
        max_new_tokens=NEW_TOKENS,
        details=True,
        decoder_input_details=True,
        top_n_tokens=3,
    )
    assert out.generated_text == text and [t.id for t in out.details.tokens] == tokens
    assert [t.id for t in out.details.prefill] == prompt_ids
    assert out.details.top_tokens is not None and [len(t) for t in out.details.top_tokens] == [3] * len(
        tokens
    )
    stream = list(
        client.text_generation(PROMPT, adapter_id=aid, max_new_tokens=NEW_TOKENS, details=True, stream=True)
    )
    assert [e.token.id for e in stream] == tokens
    assert stream[-1].generated_text == text and stream[-1].details.generated_tokens == len(tokens)
    assert (
        "".join(client.text_generation(PROMPT, adapter_id=aid, max_new_tokens=NEW_TOKENS, stream=True))
        == text
    )


def test_inference_client_errors(compat_server):
    client = InferenceClient(base_url=compat_server.url)
    with pytest.raises(TextGenerationError, match="no-such-adapter"):
        client.text_generation(PROMPT, adapter_id="no-such-adapter", max_new_tokens=2)
    with pytest.raises(ValidationError, match="typical_p"):
        client.text_generation(PROMPT, max_new_tokens=2, typical_p=0.5)


# -- openai -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_openai_sdk_completions_with_logprobs_and_echo(
    compat_server, expected, compat_tokenizer, prompt_ids, adapter
):
    client = openai.OpenAI(base_url=compat_server.url + "/v1", api_key="unused")
    model = adapter or base_name(compat_server)
    tokens = expected[adapter]
    text = compat_tokenizer.decode(tokens, skip_special_tokens=True)
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, logprobs=2
    )
    assert out.choices[0].text == text
    assert out.choices[0].logprobs.tokens == [compat_tokenizer.decode([t]) for t in tokens]
    echoed = client.completions.create(
        model=model, prompt=[prompt_ids, prompt_ids], max_tokens=0, echo=True, logprobs=1
    )
    assert [c.index for c in echoed.choices] == [0, 1]
    assert echoed.choices[0].text == PROMPT and len(echoed.choices[0].logprobs.token_logprobs) == len(
        prompt_ids
    )
    streamed = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == text


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_openai_sdk_chat_with_logprobs_and_n(compat_server, adapter):
    client = openai.OpenAI(base_url=compat_server.url + "/v1", api_key="unused")
    model = adapter or base_name(compat_server)
    turns = [{"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(
        model=model, messages=turns, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, n=2
    )
    first, second = out.choices
    assert first.message.content == second.message.content and (first.index, second.index) == (0, 1)
    content = first.logprobs.content
    assert "".join(c.token for c in content) == first.message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)
    assert out.usage.completion_tokens == 2 * len(content)
    stream = client.chat.completions.create(
        model=model, messages=turns, max_tokens=4, temperature=0, logprobs=True, stream=True
    )
    chunks = [c for c in stream if c.choices and c.choices[0].logprobs]
    # The same tokens and log-probabilities; not to the last bit: the streamed request takes its prompt's
    # first blocks from the prefix cache, so its prefill multiplies other shapes (fp32 summation order).
    assert [c.choices[0].logprobs.content[0].token for c in chunks] == [c.token for c in content]
    streamed = [c.choices[0].logprobs.content[0].logprob for c in chunks]
    assert streamed == pytest.approx([c.logprob for c in content], abs=1e-4)


def test_openai_sdk_errors(compat_server):
    client = openai.OpenAI(base_url=compat_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="lora", prompt=PROMPT, max_tokens=2, logprobs=21)
    assert raised.value.param == "logprobs"
