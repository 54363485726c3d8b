"""The JSON schemas of the HTTP bodies, as the routes parse and write them (the OpenAPI document's
`components.schemas`). Requests list the fields a route reads, with the ranges it checks; unknown fields are
ignored, as the routes ignore them. Responses list every field the routes write."""

from __future__ import annotations

from typing import Any

from adapterd.server.common.protocol import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY, MAX_SEED, MIN_SEED
from adapterd.server.http.generate import FINISH_REASONS as TGI_FINISH_REASONS
from adapterd.server.http.generate import MAX_BEST_OF
from adapterd.server.http.openai import FINISH_REASONS as OPENAI_FINISH_REASONS
from adapterd.server.http.openai import MAX_CHOICES
from adapterd.server.wire.structured import TGI_KINDS

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}
ANY_OBJECT: Schema = {"type": "object"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Schema], *required: str, closed: bool = False, **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def or_null(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def between(kind: Schema, low: float | None = None, high: float | None = None, **extra: Any) -> Schema:
    bounds = {"minimum": low} if low is not None else {}
    return {**kind, **bounds, **({"maximum": high} if high is not None else {}), **extra}


def enum(*values: Any) -> Schema:
    return {"enum": list(values)}


# -- shared parts ----------------------------------------------------------------------------------------------

TOKEN_IDS = array(between(INTEGER, 0))
STOP = {"anyOf": [STRING, array(STRING)], "description": "where generation stops (not in the output)"}
SAMPLING: dict[str, Schema] = {
    "temperature": between(NUMBER, 0, description="0 is greedy decoding"),
    "top_p": between(NUMBER, None, 1, exclusiveMinimum=0),
    "top_k": between(INTEGER, 0, description="0 keeps every token"),
    "repetition_penalty": between(NUMBER, None, None, exclusiveMinimum=0),
    "seed": between(INTEGER, MIN_SEED, MAX_SEED),
    "stop": STOP,
    "logit_bias": {
        "type": "object",
        "description": "token id (as a string) -> bias added to its logit",
        "additionalProperties": between(NUMBER, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS),
    },
    "stop_token_ids": TOKEN_IDS,
    "presence_penalty": between(NUMBER, -MAX_PENALTY, MAX_PENALTY),
    "frequency_penalty": between(NUMBER, -MAX_PENALTY, MAX_PENALTY),
}
JSON_SCHEMA_FORMAT = obj(
    {"type": enum("json_schema"), "json_schema": obj({"name": STRING, "schema": ANY_OBJECT}, "schema")},
    "type",
    "json_schema",
)
RESPONSE_FORMAT: Schema = {
    "description": "structured output: OpenAI's shapes, TGI's {type, value} and LoRAX's {type, schema}",
    "anyOf": [
        obj({"type": enum("text", "json_object"), "schema": ANY_OBJECT}, "type"),
        JSON_SCHEMA_FORMAT,
        obj({"type": enum(*TGI_KINDS), "value": {}}, "type", "value"),
    ],
}
GRAMMAR = obj(
    {"type": enum(*TGI_KINDS), "value": {"description": "a JSON schema, a regex, a Lark grammar or choices"}},
    "type",
    "value",
)
TEXT_PART = obj({"type": enum("text"), "text": STRING}, "type", "text")
MESSAGE = obj(
    {
        "role": STRING,
        "content": {"anyOf": [STRING, array(TEXT_PART)], "description": "may be absent with tool_calls"},
        "tool_calls": array(ref("ToolCall")),
    },
    "role",
)
USAGE = obj(
    {"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER},
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
)
LOGPROB = or_null(NUMBER)
SEED = or_null(INTEGER)

# -- TGI / LoRAX ---------------------------------------------------------------------------------------------------

TGI_PARAMETERS = obj(
    {
        **{k: v for k, v in SAMPLING.items() if k not in ("stop", "logit_bias")},
        "adapter_id": {**STRING, "description": "absent, empty or the base model's name: the base model"},
        "max_new_tokens": between(INTEGER, 1, default=20),
        "do_sample": BOOLEAN,
        "stop": array(STRING),
        "logit_bias": SAMPLING["logit_bias"],
        "min_new_tokens": between(INTEGER, 0),
        "ignore_eos_token": BOOLEAN,
        "details": BOOLEAN,
        "decoder_input_details": BOOLEAN,
        "top_n_tokens": between(INTEGER, 0, MAX_LOGPROBS),
        "return_k_alternatives": between(INTEGER, 0, MAX_LOGPROBS),
        "return_full_text": BOOLEAN,
        "truncate": between(INTEGER, 1),
        "best_of": between(INTEGER, 1, MAX_BEST_OF),
        "grammar": GRAMMAR,
        "response_format": RESPONSE_FORMAT,
        "typical_p": {"type": "null", "description": "not supported"},
        "watermark": {"const": False, "description": "not supported"},
        "merged_adapters": {"type": "null", "description": "not supported"},
    }
)
TGI_TOKEN = obj(
    {"id": INTEGER, "text": STRING, "logprob": LOGPROB, "special": BOOLEAN},
    "id",
    "text",
    "logprob",
    "special",
)
TGI_GENERATED_TOKEN = {
    **TGI_TOKEN,
    "properties": {**TGI_TOKEN["properties"], "alternative_tokens": array(ref("TgiToken"))},
}
TGI_FINISH = enum(*sorted(set(TGI_FINISH_REASONS.values())))
TGI_SEQUENCE_FIELDS: dict[str, Schema] = {
    "finish_reason": TGI_FINISH,
    "generated_tokens": INTEGER,
    "prompt_tokens": INTEGER,
    "seed": SEED,
    "prefill": array(ref("TgiToken")),
    "tokens": array(ref("TgiGeneratedToken")),
    "top_tokens": array(array(ref("TgiToken"))),
}
TGI_SEQUENCE_REQUIRED = ("finish_reason", "generated_tokens", "prompt_tokens", "seed", "prefill", "tokens")
TGI_DETAILS = obj(
    {**TGI_SEQUENCE_FIELDS, "best_of_sequences": array(ref("TgiSequence"))}, *TGI_SEQUENCE_REQUIRED
)
TGI_SEQUENCE = obj(
    {"generated_text": STRING, **TGI_SEQUENCE_FIELDS}, "generated_text", *TGI_SEQUENCE_REQUIRED
)
TGI_STREAM_DETAILS = obj(
    {
        "finish_reason": TGI_FINISH,
        "generated_tokens": INTEGER,
        "input_length": INTEGER,
        "prompt_tokens": INTEGER,
        "seed": SEED,
    },
    "finish_reason",
    "generated_tokens",
    "seed",
)

# -- OpenAI ----------------------------------------------------------------------------------------------------

OPENAI_COMMON: dict[str, Schema] = {
    **SAMPLING,
    "model": {**STRING, "minLength": 1, "description": "an adapter id, or the base model's name"},
    "max_tokens": between(INTEGER, 0),
    "max_completion_tokens": between(INTEGER, 0),
    "min_tokens": between(INTEGER, 0),
    "n": between(INTEGER, 1, MAX_CHOICES),
    "stream": BOOLEAN,
    "stream_options": obj({"include_usage": BOOLEAN}),
    "ignore_eos": BOOLEAN,
    "response_format": RESPONSE_FORMAT,
    "structured_outputs": obj(
        {
            "json": {},
            "regex": STRING,
            "choice": array(STRING, minItems=1),
            "grammar": STRING,
            "json_object": BOOLEAN,
        }
    ),
    "guided_json": {},
    "guided_regex": STRING,
    "guided_choice": array(STRING, minItems=1),
    "guided_grammar": STRING,
}
PROMPT = {
    "description": "a string, a list of strings, token ids, or a list of token-id lists",
    "anyOf": [
        {**STRING, "minLength": 1},
        array({**STRING, "minLength": 1}, minItems=1),
        array(between(INTEGER, 0), minItems=1),
        array(array(between(INTEGER, 0), minItems=1), minItems=1),
    ],
}
COMPLETION_REQUEST = obj(
    {
        **OPENAI_COMMON,
        "prompt": PROMPT,
        "max_tokens": between(INTEGER, 0, default=16, description="0 only with echo: score the prompt"),
        "best_of": between(INTEGER, 1, MAX_CHOICES),
        "echo": BOOLEAN,
        "logprobs": between(INTEGER, 0, MAX_LOGPROBS),
        "suffix": {"type": "null", "description": "not supported"},
    },
    "model",
    "prompt",
)
TOOL = obj(
    {
        "type": enum("function"),
        "function": obj({"name": STRING, "description": STRING, "parameters": ANY_OBJECT}, "name"),
    },
    "type",
    "function",
)
CHAT_REQUEST = obj(
    {
        **OPENAI_COMMON,
        "messages": array(MESSAGE, minItems=1),
        "logprobs": BOOLEAN,
        "top_logprobs": between(INTEGER, 0, MAX_LOGPROBS),
        "tools": array(TOOL, minItems=1),
        "tool_choice": {
            "anyOf": [
                enum("none", "auto", "required"),
                obj({"type": enum("function"), "function": obj({"name": STRING}, "name")}, "function"),
            ]
        },
        "parallel_tool_calls": BOOLEAN,
    },
    "model",
    "messages",
)
OPENAI_FINISH = or_null(enum(*sorted({*OPENAI_FINISH_REASONS.values(), "tool_calls"})))
LEGACY_LOGPROBS = obj(
    {
        "tokens": array(STRING),
        "token_logprobs": array(LOGPROB),
        "top_logprobs": array(or_null({"type": "object", "additionalProperties": NUMBER})),
        "text_offset": array(INTEGER),
    },
    "tokens",
    "token_logprobs",
    "top_logprobs",
    "text_offset",
)
CHAT_TOKEN_FIELDS = {"token": STRING, "logprob": NUMBER, "bytes": array(INTEGER)}
CHAT_LOGPROBS = obj(
    {
        "content": array(
            obj(
                {**CHAT_TOKEN_FIELDS, "top_logprobs": array(obj(CHAT_TOKEN_FIELDS, *CHAT_TOKEN_FIELDS))},
                *CHAT_TOKEN_FIELDS,
                "top_logprobs",
            )
        ),
        "refusal": {"type": "null"},
    },
    "content",
)
TOOL_CALL = obj(
    {
        "id": STRING,
        "type": enum("function"),
        "function": obj({"name": STRING, "arguments": STRING}, "name", "arguments"),
    },
    "id",
    "type",
    "function",
)


def envelope(kind: str, choice: Schema, usage: bool = True) -> Schema:
    """OpenAI's {id, object, created, model, choices, usage}."""
    fields = {
        "id": STRING,
        "object": enum(kind),
        "created": INTEGER,
        "model": STRING,
        "choices": array(choice),
        "usage": USAGE,
    }
    return obj(fields, "id", "object", "created", "model", "choices", *(("usage",) if usage else ()))


COMPLETION_CHOICE = obj(
    {"index": INTEGER, "text": STRING, "finish_reason": OPENAI_FINISH, "logprobs": or_null(LEGACY_LOGPROBS)},
    "index",
    "text",
    "finish_reason",
    "logprobs",
)
CHAT_MESSAGE = obj(
    {"role": enum("assistant"), "content": or_null(STRING), "tool_calls": array(ref("ToolCall"))},
    "role",
    "content",
)
CHAT_CHOICE = obj(
    {
        "index": INTEGER,
        "message": CHAT_MESSAGE,
        "finish_reason": OPENAI_FINISH,
        "logprobs": or_null(CHAT_LOGPROBS),
    },
    "index",
    "message",
    "finish_reason",
    "logprobs",
)
CHAT_DELTA_CHOICE = obj(
    {
        "index": INTEGER,
        "delta": obj({"role": STRING, "content": STRING, "tool_calls": array(ANY_OBJECT)}),
        "finish_reason": OPENAI_FINISH,
        "logprobs": or_null(CHAT_LOGPROBS),
    },
    "index",
    "delta",
    "finish_reason",
)

# -- adapters, tokenizer, operations -------------------------------------------------------------------------

ADAPTER_FIELDS: dict[str, Schema] = {
    "id": STRING,
    "type": enum("lora", "dora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning"),
    "rank": or_null(INTEGER),
    "num_virtual_tokens": or_null(INTEGER),
    "target_modules": array(STRING),
    "base_model": STRING,
    "version": between(INTEGER, 1),
    "sha256": {**STRING, "pattern": "^[0-9a-f]{64}$"},
    "size_bytes": between(INTEGER, 0),
    "created_at": {**STRING, "format": "date-time"},
    "metadata": ANY_OBJECT,
}
ADAPTER = obj({**ADAPTER_FIELDS, "residency": enum("disk", "cpu", "gpu")}, *ADAPTER_FIELDS, "residency")
DELETED_ADAPTER = obj({**ADAPTER_FIELDS, "deleted": {"const": True}}, *ADAPTER_FIELDS, "deleted")
UPLOAD_FORM = obj(
    {
        "adapter_config.json": {**STRING, "format": "binary"},
        "adapter_model.safetensors": {**STRING, "format": "binary"},
        "metadata": {**STRING, "description": "a JSON object stored with the version"},
    },
    "adapter_config.json",
    "adapter_model.safetensors",
)
TOKENIZE_REQUEST = {
    "anyOf": [
        obj({"prompt": STRING}, "prompt"),
        obj({"messages": array(MESSAGE, minItems=1)}, "messages"),
    ],
    "properties": {
        "model": {**STRING, "description": "the adapter (or base model) whose context limit to report"},
        "add_special_tokens": BOOLEAN,
        "return_token_strs": BOOLEAN,
    },
}
NULLABLE_STRING = or_null(STRING)
TOKENIZER_INFO = obj(
    {
        "tokenizer_class": STRING,
        **{name: NULLABLE_STRING for name in ("eos_token", "bos_token", "pad_token", "unk_token")},
        "chat_template": NULLABLE_STRING,
        "model_max_length": INTEGER,
    },
    "tokenizer_class",
    "model_max_length",
)
INFO_FIELDS: dict[str, Schema] = {
    "model_id": STRING,
    "model_dtype": STRING,
    "quantize": NULLABLE_STRING,
    "device": STRING,
    **{
        name: INTEGER
        for name in (
            "max_batch",
            "max_rank",
            "max_gpu_adapters",
            "max_cpu_adapters",
            "kv_cache_tokens",
            "max_total_tokens",
        )
    },
    "version": STRING,
    "auth": {"enum": ["open", "api_keys"]},
    "trainer": {"type": "boolean"},
}
HEALTH = obj(
    {"status": enum("ok", "unhealthy"), "reason": {**STRING, "description": "why it is unhealthy"}}, "status"
)
OPENAI_ERROR = obj(
    {
        "error": obj(
            {"message": STRING, "type": STRING, "param": NULLABLE_STRING, "code": INTEGER},
            "message",
            "type",
            "param",
            "code",
        )
    },
    "error",
)
TGI_ERROR = obj({"error": STRING, "error_type": STRING}, "error", "error_type")

SCHEMAS: dict[str, Schema] = {
    "TgiRequest": obj(
        {
            "inputs": {**STRING, "minLength": 1},
            "parameters": TGI_PARAMETERS,
            "stream": {**BOOLEAN, "description": "POST / only: answer as /generate_stream does"},
        },
        "inputs",
    ),
    "TgiToken": TGI_TOKEN,
    "TgiGeneratedToken": TGI_GENERATED_TOKEN,
    "TgiSequence": TGI_SEQUENCE,
    "TgiResponse": obj({"generated_text": STRING, "details": TGI_DETAILS}, "generated_text"),
    "TgiStreamEvent": obj(
        {
            "index": INTEGER,
            "token": ref("TgiGeneratedToken"),
            "top_tokens": or_null(array(ref("TgiToken"))),
            "generated_text": NULLABLE_STRING,
            "details": or_null(TGI_STREAM_DETAILS),
        },
        "index",
        "token",
        "generated_text",
        "details",
    ),
    "CompletionRequest": COMPLETION_REQUEST,
    "Completion": envelope("text_completion", COMPLETION_CHOICE),
    "CompletionChunk": envelope("text_completion", COMPLETION_CHOICE, usage=False),
    "ChatCompletionRequest": CHAT_REQUEST,
    "ChatCompletion": envelope("chat.completion", CHAT_CHOICE),
    "ChatCompletionChunk": envelope("chat.completion.chunk", CHAT_DELTA_CHOICE, usage=False),
    "ToolCall": TOOL_CALL,
    "ModelList": obj(
        {
            "object": enum("list"),
            "data": array(
                obj(
                    {
                        "id": STRING,
                        "object": enum("model"),
                        "created": INTEGER,
                        "owned_by": STRING,
                        "parent": NULLABLE_STRING,
                    },
                    "id",
                    "object",
                    "created",
                    "owned_by",
                    "parent",
                )
            ),
        },
        "object",
        "data",
    ),
    "Adapter": ADAPTER,
    "AdapterList": obj({"object": enum("list"), "data": array(ref("Adapter"))}, "object", "data"),
    "DeletedAdapter": DELETED_ADAPTER,
    "UploadForm": UPLOAD_FORM,
    "LoadLoraRequest": obj(
        {
            "lora_name": {**STRING, "minLength": 1},
            "lora_path": {**STRING, "minLength": 1, "description": "under a directory the operator allowed"},
        },
        "lora_name",
        "lora_path",
    ),
    "UnloadLoraRequest": obj({"lora_name": {**STRING, "minLength": 1}}, "lora_name"),
    "TokenizeRequest": TOKENIZE_REQUEST,
    "TokenizeResponse": obj(
        {
            "count": INTEGER,
            "max_model_len": INTEGER,
            "tokens": array(INTEGER),
            "token_strs": or_null(array(STRING)),
        },
        "count",
        "max_model_len",
        "tokens",
        "token_strs",
    ),
    "DetokenizeRequest": obj({"tokens": TOKEN_IDS, "model": STRING}, "tokens"),
    "DetokenizeResponse": obj({"prompt": STRING}, "prompt"),
    "TokenizerInfo": TOKENIZER_INFO,
    "Info": obj(INFO_FIELDS, *INFO_FIELDS),
    "Health": HEALTH,
    "Error": OPENAI_ERROR,
    "TgiError": TGI_ERROR,
}
