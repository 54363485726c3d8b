"""Structured output and the sampling options beside it.

In the engine (the Python API): every constrained output over 53 varied schemas and regexes parses and
validates (jsonschema, re.fullmatch), greedy and sampled, with base, LoRA and soft-prompt rows mixed in one
batch; an unconstrained row in that batch gives exactly the tokens it gives alone. Through a real server:
the `openai` SDK's response_format and tool calls, the TGI route's grammar (with huggingface_hub's
InferenceClient), our HTTP and gRPC clients, and bad input refused with a 400 naming the field before
anything reaches the engine."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import torch
from huggingface_hub import InferenceClient

from adapterd.clients import Client, GrpcClient, InvalidRequest
from adapterd.server.common.config import MAX_GRAMMAR_BYTES, EngineConfig
from adapterd.server.common.protocol import GenerateRequest, SamplingParams, constraint
from adapterd.server.llm import LLM
from tests.e2e.serving import Server, running_server
from tests.structured_cases import REGEXES, SCHEMAS

ADAPTERS = (None, "lora", "soft")
PROMPTS = ["Reply in JSON.", "The answer is", "Fill in the form:", "Output:"]
BUDGET = 160  # tokens: far more than any bounded case needs
FORMATS = jsonschema.FormatChecker()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}


@pytest.fixture(scope="module")
def llm(compat_model: Path, compat_adapters: dict[str, Path]) -> Iterator[LLM]:
    with LLM(
        model=str(compat_model), quantize="none", device="cpu", engine=EngineConfig(max_batch=64)
    ) as llm:
        for adapter_id, path in compat_adapters.items():
            llm.add_adapter(adapter_id, path)
        yield llm


def cases() -> list[tuple[str, Any]]:
    return [("json_schema", s) for s in SCHEMAS] + [("regex", r) for r in REGEXES]


def constrained_requests(temperature: float) -> list[GenerateRequest]:
    return [
        GenerateRequest(
            prompt=PROMPTS[i % len(PROMPTS)],
            adapter_id=ADAPTERS[i % len(ADAPTERS)],
            params=SamplingParams(
                max_new_tokens=BUDGET,
                temperature=temperature,
                seed=i,
                constraint=constraint(kind, value, "x"),
            ),
        )
        for i, (kind, value) in enumerate(cases())
    ]


def check_output(kind: str, value: Any, text: str) -> None:
    if kind == "regex":
        assert re.fullmatch(value, text), (value, text)
    else:
        jsonschema.validate(json.loads(text), value, format_checker=FORMATS)


# -- in the engine ------------------------------------------------------------------------------------------


def test_there_are_at_least_fifty_cases() -> None:
    assert len(cases()) >= 50


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_every_constrained_output_parses_and_validates_in_one_mixed_batch(
    llm: LLM, temperature: float
) -> None:
    plain = GenerateRequest(
        prompt="Once upon a time", adapter_id="lora", params=SamplingParams(max_new_tokens=24)
    )
    requests = [*constrained_requests(temperature), plain]
    done = llm.generate(requests)
    for (kind, value), completion in zip(cases(), done, strict=False):
        assert completion.finish_reason == "stop", (value, completion.text)
        check_output(kind, value, completion.text)
    assert done[-1].finish_reason == "length"


def test_an_unconstrained_row_gives_the_tokens_it_gives_alone(llm: LLM) -> None:
    plain = [
        GenerateRequest(prompt=p, adapter_id=a, params=SamplingParams(max_new_tokens=20, ignore_eos=True))
        for p, a in zip(PROMPTS, ("soft", None, "lora", "soft"), strict=True)
    ]
    alone = [llm.generate([r])[0] for r in plain]
    mixed = llm.generate([*constrained_requests(0.0)[:20], *plain])[20:]
    assert [c.token_ids for c in mixed] == [c.token_ids for c in alone]
    for a, m in zip(alone, mixed, strict=True):
        assert [s.logprob for s in m.logprobs] == pytest.approx([s.logprob for s in a.logprobs], abs=1e-4)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_choices_lark_grammars_and_any_json_object(llm: LLM, adapter: str | None) -> None:
    choices = ['say "yes"', "no\nway", "maybe"]
    lark = 'start: "(" sum ")"\nsum: NUM ("+" NUM)*\nNUM: /[1-9][0-9]?/'
    obj = constraint("json_object", None, "x")
    requests = [
        GenerateRequest(
            prompt="Pick:",
            adapter_id=adapter,
            params=SamplingParams(max_new_tokens=BUDGET, temperature=t, seed=s, constraint=c),
        )
        for s, t in enumerate((0.0, 1.0, 1.0))
        for c in (constraint("choice", choices, "x"), constraint("grammar", lark, "x"))
    ]
    done = llm.generate(requests)
    for request, completion in zip(requests, done, strict=True):
        assert completion.finish_reason == "stop"
        if request.params.constraint.kind == "choice":  # type: ignore[union-attr]
            assert completion.text in choices
        else:
            assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", completion.text)
    # Any JSON object: a random model writes long strings, so this one gets a nudge towards closing them.
    nudge = tuple((token, 8.0) for token in llm.tokenizer.convert_tokens_to_ids(['"', '",', '"}', "}"]))
    [done_obj] = llm.generate(
        [
            GenerateRequest(
                prompt="{",
                adapter_id=adapter,
                params=SamplingParams(max_new_tokens=BUDGET, constraint=obj, logit_bias=nudge),
            )
        ]
    )
    assert done_obj.finish_reason == "stop" and isinstance(json.loads(done_obj.text), dict)


def test_a_compiled_grammar_is_cached_by_its_text(llm: LLM) -> None:
    schema = constraint("json_schema", {"type": "object", "properties": {"n": {"type": "integer"}}}, "x")
    first = llm.grammars.matcher(schema)
    cached = llm.grammars._compiled[schema.key]
    second = llm.grammars.matcher(constraint("json_schema", json.loads(schema.value), "y"))
    assert llm.grammars._compiled[schema.key] is cached and first is not second


# -- sampling options, in the engine --------------------------------------------------------------------------


def test_logit_bias_min_tokens_and_stop_token_ids(llm: LLM) -> None:
    eos = llm.tokenizer.eos_token_id
    forced = llm.tokenizer.convert_tokens_to_ids("Ġthe")

    def run(**params: Any) -> Any:
        request = GenerateRequest(prompt="Hello", params=SamplingParams(max_new_tokens=12, **params))
        return llm.generate([request])[0]

    assert run(logit_bias=((forced, 100.0),)).token_ids == (forced,) * 12
    ended = run(logit_bias=((eos, 100.0),), min_tokens=5)
    assert len(ended.token_ids) == 6 and ended.token_ids[-1] == eos and eos not in ended.token_ids[:5]
    assert ended.finish_reason == "eos"
    stopped = run(logit_bias=((forced, 100.0),), stop_token_ids=(forced,))
    assert stopped.token_ids == (forced,) and stopped.finish_reason == "stop"
    held = run(logit_bias=((forced, 100.0),), stop_token_ids=(forced,), min_tokens=3)
    assert len(held.token_ids) == 4 and forced not in held.token_ids[:3] and held.token_ids[3] == forced


def penalised_greedy(
    model: Any, prompt_ids: list[int], new_tokens: int, presence: float, frequency: float
) -> list[int]:
    """OpenAI's penalties, from their definition, over a transformers forward pass per token: the logit of
    every token generated so far loses `presence` once and `frequency` per time it was generated."""
    ids, out = list(prompt_ids), []
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        for token in set(out):
            logits[token] -= presence + frequency * out.count(token)
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize(("presence", "frequency"), [(2.0, 0.0), (0.0, 2.0), (-2.0, 0.0), (0.5, 1.0)])
def test_presence_and_frequency_penalties_match_their_definition(
    llm: LLM, compat_peft: dict[str, Any], presence: float, frequency: float
) -> None:
    prompt = "Hello there, my"
    prompt_ids = list(llm.tokenizer(prompt).input_ids)
    params = SamplingParams(
        max_new_tokens=30, ignore_eos=True, presence_penalty=presence, frequency_penalty=frequency
    )
    [done] = llm.generate([GenerateRequest(prompt=prompt, params=params)])
    expected = penalised_greedy(compat_peft[""], prompt_ids, 30, presence, frequency)
    assert list(done.token_ids) == expected
    [free] = llm.generate(
        [GenerateRequest(prompt=prompt, params=SamplingParams(max_new_tokens=30, ignore_eos=True))]
    )
    assert free.token_ids != done.token_ids  # the penalty changed the output (the case is not vacuous)


# -- through a server -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdk(compat_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=compat_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("adapter", ["lora", "soft"])
def test_openai_sdk_response_format_json_schema(sdk: openai.OpenAI, adapter: str) -> None:
    schema = SCHEMAS[19]  # {name, age}
    out = sdk.chat.completions.create(
        model=adapter,
        messages=[{"role": "user", "content": "Who are you?"}],
        max_tokens=BUDGET,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content or ""), schema)
    streamed = sdk.chat.completions.create(
        model=adapter,
        messages=[{"role": "user", "content": "Who are you?"}],
        max_tokens=BUDGET,
        temperature=0,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == choice.message.content


def test_openai_sdk_completions_with_a_regex_and_a_choice(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(
        model="lora",
        prompt="Phone:",
        max_tokens=BUDGET,
        temperature=0,
        extra_body={"structured_outputs": {"regex": REGEXES[0]}},
    )
    assert re.fullmatch(REGEXES[0], out.choices[0].text)
    out = sdk.completions.create(
        model="soft", prompt="Pick:", max_tokens=BUDGET, extra_body={"guided_choice": ["left", "right"]}
    )
    assert out.choices[0].text in ("left", "right")


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_sdk_tool_calls(sdk: openai.OpenAI, tool_choice: Any, stream: bool) -> None:
    request = dict(
        model="lora",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        max_tokens=BUDGET,
        temperature=0,
    )
    if stream:
        calls: dict[int, dict[str, str]] = {}
        reasons = []
        for chunk in sdk.chat.completions.create(**request, stream=True):  # type: ignore[call-overload]
            for choice in chunk.choices:
                reasons.append(choice.finish_reason)
                for delta in choice.delta.tool_calls or []:
                    call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
        assert reasons[-1] == "tool_calls"
        made = [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    else:
        out = sdk.chat.completions.create(**request)  # type: ignore[call-overload]
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and message.content is None
        assert all(call.type == "function" and call.id.startswith("call_") for call in message.tool_calls)
        made = [(call.function.name, call.function.arguments) for call in message.tool_calls]
    assert made
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
    for name, arguments in made:
        jsonschema.validate(json.loads(arguments), schemas[name])
    if isinstance(tool_choice, dict):
        assert [name for name, _ in made] == ["get_weather"]


def after_a_call(name: str, arguments: str, result: str) -> list[Any]:
    """A conversation in which the assistant called `name` and the tool answered `result`."""
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}
    return [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
    ]


def test_openai_sdk_tool_choice_auto_and_a_conversation_with_tool_results(sdk: openai.OpenAI) -> None:
    turns = after_a_call("get_weather", '{"city": "Oslo", "days": 1}', "Sunny, 12 C")
    out = sdk.chat.completions.create(
        model="soft", messages=turns, tools=[WEATHER], max_tokens=24, temperature=0
    )
    message = out.choices[0].message
    if message.tool_calls:  # the model chose to call again: the call is valid
        jsonschema.validate(
            json.loads(message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"]
        )
    else:  # the model answered in text: never the start of a malformed call
        assert message.content and not message.content.lstrip().startswith("[")


def test_openai_sdk_logit_bias_and_vllm_options(sdk: openai.OpenAI, compat_tokenizer: Any) -> None:
    forced = compat_tokenizer.convert_tokens_to_ids("Ġthe")
    out = sdk.completions.create(
        model="lora", prompt="Hello", max_tokens=5, temperature=0, logit_bias={str(forced): 100}, logprobs=0
    )
    assert out.choices[0].text == " the" * 5
    out = sdk.completions.create(
        model="lora",
        prompt="Hello",
        max_tokens=8,
        temperature=0,
        logit_bias={str(forced): 100},
        extra_body={"stop_token_ids": [forced], "min_tokens": 2},
    )
    assert out.choices[0].text.endswith(" the") and not out.choices[0].text.startswith(" the")


def test_tgi_grammar_with_huggingface_hub_and_lorax_response_format(compat_server: Server) -> None:
    client = InferenceClient(compat_server.url)
    schema = SCHEMAS[24]  # {status, count}
    out = client.text_generation(
        "Status:", max_new_tokens=BUDGET, grammar={"type": "json", "value": schema}, details=True
    )
    assert out.details.finish_reason == "stop_sequence"
    jsonschema.validate(json.loads(out.generated_text), schema)
    out = client.text_generation(
        "Code:", max_new_tokens=BUDGET, grammar={"type": "regex", "value": REGEXES[6]}
    )
    assert re.fullmatch(REGEXES[6], out)
    body = {
        "inputs": "Person:",
        "parameters": {
            "adapter_id": "lora",
            "max_new_tokens": BUDGET,
            "response_format": {"type": "json_object", "schema": SCHEMAS[19]},
        },
    }
    answer = httpx.post(compat_server.url + "/generate", json=body, timeout=60).json()
    jsonschema.validate(json.loads(answer["generated_text"]), SCHEMAS[19])


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_our_clients_take_structured_output_and_the_sampling_options(
    compat_server: Server, transport: str
) -> None:
    client = Client(compat_server.url) if transport == "http" else GrpcClient(compat_server.grpc_target)
    with client:
        out = client.generate("Person:", adapter_id="lora", max_new_tokens=BUDGET, json_schema=SCHEMAS[21])
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMAS[21])
        assert client.generate("Pick:", adapter_id="soft", choice=["on", "off"], max_new_tokens=8).text in (
            "on",
            "off",
        )
        assert re.fullmatch(
            REGEXES[1],
            client.chat([{"role": "user", "content": "Well?"}], regex=REGEXES[1], max_new_tokens=8).text,
        )
        lark = 'start: "x" "y"*'
        assert re.fullmatch("xy*", client.generate("Go:", grammar=lark, max_new_tokens=6, min_tokens=3).text)
        forced = out.token_ids[0] if out.token_ids else 0
        biased = client.generate("Hi", logit_bias={forced: 100}, max_new_tokens=3, ignore_eos=True)
        assert biased.token_ids == [forced] * 3
        stopped = client.generate(
            "Hi",
            logit_bias={forced: 100},
            stop_token_ids=[forced],
            max_new_tokens=3,
            presence_penalty=0.5,
            frequency_penalty=0.5,
        )
        assert stopped.token_ids == [forced] and stopped.finish_reason == "stop"
        with pytest.raises(InvalidRequest, match="regular expression"):
            client.generate("Hi", regex="[a-", max_new_tokens=3)


# -- bad input ----------------------------------------------------------------------------------------------

HUGE = {
    "type": "object",
    "properties": {
        f"p{i}": {"type": "string", "description": "x" * 40} for i in range(MAX_GRAMMAR_BYTES // 40)
    },
}
BAD_CHAT = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "frobnicate"}},
            }
        },
        "response_format.json_schema.schema",
        "Invalid type",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
            }
        },
        "response_format.json_schema.schema",
        "minimum",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nowhere"}},
            }
        },
        "response_format.json_schema.schema",
        "nowhere",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            }
        },
        "response_format.json_schema.schema",
        "uniqueItems",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": HUGE}}},
        "response_format.json_schema.schema",
        "limit",
    ),
    ({"response_format": {"type": "yaml"}}, "response_format", "type"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "regular expression"),
    ({"structured_outputs": {"regex": "[a&&b]"}}, "structured_outputs.regex", "no output can satisfy"),
    ({"structured_outputs": {"regex": "(?!a)b"}}, "structured_outputs.regex", "look-around"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar", "grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    (
        {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
        "structured_outputs.regex",
        "one",
    ),
    ({"logit_bias": {"10": 101}}, "logit_bias", "-100..100"),
    ({"logit_bias": {"999999": 1}}, "logit_bias", "vocabulary"),
    ({"logit_bias": {"-1": 1}}, "logit_bias", "vocabulary"),
    ({"logit_bias": {"ten": 1}}, "logit_bias", "token id"),
    ({"stop_token_ids": [49152]}, "stop_token_ids", "vocabulary"),
    ({"min_tokens": 99}, "min_tokens", "max_new_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty", "-2..2"),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        "not in tools",
    ),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "name"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
]


def requests_counted(server: Server) -> float:
    metrics = httpx.get(server.url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("adapterd_requests_total")
    )


@pytest.mark.parametrize(
    ("extra", "param", "says"), BAD_CHAT, ids=[f"{i}-{p}" for i, (_, p, _) in enumerate(BAD_CHAT)]
)
def test_bad_structured_input_is_a_400_naming_the_field(
    compat_server: Server, extra: dict, param: str, says: str
) -> None:
    before = requests_counted(compat_server)
    body = {"model": "lora", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, **extra}
    response = httpx.post(compat_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert requests_counted(compat_server) == before  # refused before it reached the engine


def test_bad_tgi_grammar_is_a_validation_error(compat_server: Server) -> None:
    for grammar, says in [
        ({"type": "regex", "value": "(?!x)"}, "parameters.grammar.value"),
        ({"type": "yaml", "value": "a"}, "parameters.grammar"),
    ]:
        response = httpx.post(
            compat_server.url + "/generate",
            json={"inputs": "Hi", "parameters": {"grammar": grammar}},
            timeout=60,
        )
        assert response.status_code == 400 and response.json()["error_type"] == "validation"
        assert says in response.json()["error"]


# -- a chat template with its own tool-call format (Hermes, Qwen) ------------------------------------------

HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions. Their signatures: <tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>
For each call answer <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def hermes_server(compat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The compat model with a chat template that renders tools and writes calls in <tool_call> tags."""
    model = tmp_path_factory.mktemp("hermes-model")
    for path in compat_model.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    (model / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    root = tmp_path_factory.mktemp("hermes-server")
    with running_server(model, root / "store", root / "server.log") as server:
        yield server


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_a_hermes_template_gets_the_tools_and_its_own_call_format(
    hermes_server: Server, tool_choice: str
) -> None:
    sdk = openai.OpenAI(base_url=hermes_server.url + "/v1", api_key="unused", max_retries=0)
    model = httpx.get(hermes_server.url + "/info").json()["model_id"]
    turns = after_a_call("get_time", '{"zone": "CET"}', "12:00")
    tokens = httpx.post(hermes_server.url + "/tokenize", json={"model": model, "messages": turns}).json()[
        "count"
    ]
    out = sdk.chat.completions.create(
        model=model,
        messages=turns,
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        max_tokens=BUDGET,
        temperature=0,
    )  # type: ignore[arg-type]
    assert out.usage.prompt_tokens > tokens + 40  # the template rendered the tools (and the earlier call)
    message = out.choices[0].message
    if tool_choice == "required" or message.tool_calls:
        assert out.choices[0].finish_reason == "tool_calls"
        schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
        for call in message.tool_calls or []:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert len(message.tool_calls or []) == 1  # parallel_tool_calls: false
    else:
        assert message.content and not message.content.startswith("<")
