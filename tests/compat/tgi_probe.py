"""Runs inside the TGI-clients environment (tests/compat/tgi-clients.txt): calls the real, unmodified
`lorax-client` and `text-generation` packages against a server and prints what they parsed, as JSON.

Usage: python tgi_probe.py '{"url": ..., "prompt": ..., "new_tokens": ..., "adapters": ["", "lora", ...],
                             "schema": {...}, "regex": ..., "structured_tokens": ...}'
"""

from __future__ import annotations

import json
import sys
from typing import Any

UNKNOWN = "no-such-adapter"


def error_name(call: Any) -> str | None:
    try:
        call()
    except Exception as exc:
        return f"{type(exc).__module__}.{type(exc).__name__}"
    return None


def lorax_calls(args: dict[str, Any]) -> dict[str, Any]:
    from lorax import Client

    client = Client(args["url"])
    prompt, n = args["prompt"], args["new_tokens"]
    out: dict[str, Any] = {}
    for adapter in args["adapters"]:
        aid = adapter or None
        generated = client.generate(
            prompt, adapter_id=aid, max_new_tokens=n, decoder_input_details=True, return_k_alternatives=2
        )
        stream = client.generate_stream(prompt, adapter_id=aid, max_new_tokens=n)
        out[adapter] = {
            "generate": generated.model_dump(mode="json"),
            "stream": [event.model_dump(mode="json") for event in stream],
        }
    out["best_of"] = client.generate(
        prompt, adapter_id="lora", max_new_tokens=n, do_sample=True, best_of=2
    ).model_dump(mode="json")
    # The client posts streams to its base URL (POST / with "stream": true); aimed at /generate_stream, the
    # same parsing covers that route's events.
    on_route = Client(f"{args['url']}/generate_stream").generate_stream(
        prompt, adapter_id="lora", max_new_tokens=n
    )
    out["stream_route"] = [event.model_dump(mode="json") for event in on_route]
    out["unknown"] = error_name(lambda: client.generate(prompt, adapter_id=UNKNOWN, max_new_tokens=2))
    out["invalid"] = error_name(lambda: client.generate(prompt, max_new_tokens=2, typical_p=0.5))
    budget, schema = args["structured_tokens"], args["schema"]
    out["structured"] = client.generate(
        prompt,
        adapter_id="lora",
        max_new_tokens=budget,
        response_format={"type": "json_object", "schema": schema},
    ).model_dump(mode="json")
    stream = client.generate_stream(
        prompt,
        adapter_id="soft",
        max_new_tokens=budget,
        response_format={"type": "json_object", "schema": schema},
    )
    out["structured_stream"] = [event.model_dump(mode="json") for event in stream]
    return out


def text_generation_calls(args: dict[str, Any]) -> dict[str, Any]:
    from text_generation import Client

    prompt, n = args["prompt"], args["new_tokens"]
    out: dict[str, Any] = {}
    for adapter in args["adapters"]:
        # text-generation has no adapter_id parameter: the adapter goes in the URL.
        client = Client(f"{args['url']}/models/{adapter}" if adapter else args["url"])
        generated = client.generate(prompt, max_new_tokens=n, decoder_input_details=True, top_n_tokens=2)
        stream = client.generate_stream(prompt, max_new_tokens=n, top_n_tokens=2)
        out[adapter] = {
            "generate": generated.model_dump(mode="json"),
            "stream": [event.model_dump(mode="json") for event in stream],
        }
    base = Client(args["url"])
    on_route = Client(f"{args['url']}/models/lora/generate_stream").generate_stream(prompt, max_new_tokens=n)
    out["stream_route"] = [event.model_dump(mode="json") for event in on_route]
    out["best_of"] = base.generate(prompt, max_new_tokens=n, do_sample=True, best_of=2).model_dump(
        mode="json"
    )
    unknown = Client(f"{args['url']}/models/{UNKNOWN}")
    out["unknown"] = error_name(lambda: unknown.generate(prompt, max_new_tokens=2))
    out["invalid"] = error_name(lambda: base.generate(prompt, max_new_tokens=2, typical_p=0.5))
    from text_generation.types import Grammar, GrammarType

    budget, lora = args["structured_tokens"], Client(f"{args['url']}/models/lora")
    json_grammar = Grammar(type=GrammarType.Json, value=args["schema"])
    out["structured"] = lora.generate(prompt, max_new_tokens=budget, grammar=json_grammar).model_dump(
        mode="json"
    )
    regex = Grammar(type=GrammarType.Regex, value=args["regex"])
    out["structured_regex"] = base.generate(prompt, max_new_tokens=budget, grammar=regex).model_dump(
        mode="json"
    )
    bad = Grammar(type=GrammarType.Regex, value="(?!x)")
    out["structured_invalid"] = error_name(lambda: base.generate(prompt, max_new_tokens=2, grammar=bad))
    return out


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1])
    print(json.dumps({"lorax": lorax_calls(arguments), "text_generation": text_generation_calls(arguments)}))
