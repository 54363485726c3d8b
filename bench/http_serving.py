"""python -m bench.http_serving: adapterd as users meet it, through a real `adapterd serve` over HTTP.

Concurrent streaming clients (`/v1/chat/completions`, `stream: true`, greedy, `ignore_eos`) against a server
on a loopback port, with 8 random rank-16 all-linear LoRAs uploaded, in one run:

  single      one stream on one LoRA, one request after another
  base8       8 concurrent requests on the base model
  lora8       8 concurrent requests on 8 distinct LoRAs
  poisson     Poisson arrivals at each of --rates (requests/s), the base and the 8 LoRAs in turn
  system      16 requests sharing a 512-token system prompt on one LoRA, one after another, then the same
              prompt on another LoRA (the prefix cache must not serve it)
  long        7 streams decoding when a 2,000-token prompt arrives: their inter-token latency
  peft        transformers + PEFT's mixed-batch `generate()` on the lora8 (and base8) prompts: the ratio

Each case reports generated tokens/s end to end (first request sent to last token received), TTFT,
inter-token latency and end-to-end latency percentiles. Writes bench/results-serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

NUM_ADAPTERS = 8
RANK = 16
NEW_TOKENS = 32
QUESTIONS = [
    "Write a short note to a colleague about the weekly planning meeting.",
    "Explain in two sentences why the sky looks blue during the day.",
    "List three things to pack for a weekend trip to the mountains.",
    "Describe how to make a cup of green tea, step by step.",
    "Give a friendly reminder that the library closes early on Friday.",
    "Summarise the plot of a detective story in a few sentences.",
    "Suggest a name for a small bakery that sells sourdough bread.",
    "Tell me a fun fact about octopuses and their intelligence.",
]
# A new loopback connection per request, for every server alike: llama-server may close a kept-alive
# connection just as the next request reuses it ("Server disconnected without sending a response").
FRESH_CONNECTIONS = httpx.Limits(max_keepalive_connections=0)
# Extra request fields per server URL (the llama.cpp peer picks its LoRA by index, not by model name).
PEER_BODY: dict[str, Any] = {}
SYSTEM_SENTENCE = "You are the support assistant of a parcel delivery company and you answer politely. "


@dataclass
class Request:
    """One streamed request as the client saw it (perf_counter seconds)."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.sent


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


def summary(requests: list[Request]) -> dict[str, Any]:
    tokens = sum(r.completion_tokens for r in requests)
    wall = max(r.token_times[-1] for r in requests) - min(r.sent for r in requests)
    return {
        "requests": len(requests),
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_s": percentiles([r.ttft for r in requests]),
        "itl_s": percentiles([t for r in requests for t in r.itls]),
        "e2e_s": percentiles([r.e2e for r in requests]),
    }


# -- the server ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(store: Path, log: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        *(
            str(Path(sys.executable).with_name("adapterd")),
            "serve",
            "--model",
            "default",
            "--quantize",
            "none",
        ),
        *(
            "--device",
            "cpu",
            "--store",
            str(store),
            "--http-port",
            str(port),
            "--grpc-port",
            str(free_port()),
        ),
        *("--max-rank", str(RANK), *extra),
    ]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(process, url, "adapterd serve", log)
    return process, url


def wait_healthy(process: subprocess.Popen[bytes], url: str, name: str, log: Path) -> None:
    """Wait (at most 5 minutes) until the server at `url` answers /health with 200; kill it otherwise."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{name} did not become healthy")


def upload(url: str, adapter_id: str, path: Path) -> None:
    files = {
        name: (name, (path / name).read_bytes())
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    response = httpx.put(f"{url}/v1/adapters/{adapter_id}", files=files, timeout=120)
    response.raise_for_status()


# -- the clients -----------------------------------------------------------------------------------------


async def chat(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    extra: dict[str, Any] | None = None,
) -> Request:
    body = {
        **(extra or {}),
        **PEER_BODY.get(url, lambda model: {})(model),
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    record = Request(time.perf_counter())
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                record.completion_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                record.token_times.append(time.perf_counter())
    return record


def user(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


async def concurrent(url: str, models: list[str], max_tokens: int = NEW_TOKENS) -> list[Request]:
    async with httpx.AsyncClient(timeout=600, limits=FRESH_CONNECTIONS) as client:
        calls = [
            chat(client, url, m, user(QUESTIONS[i % len(QUESTIONS)]), max_tokens)
            for i, m in enumerate(models)
        ]
        return list(await asyncio.gather(*calls))


async def sequential(url: str, model: str, count: int, messages: Any = None) -> list[Request]:
    async with httpx.AsyncClient(timeout=600, limits=FRESH_CONNECTIONS) as client:
        return [
            await chat(client, url, model, messages(i) if messages else user(QUESTIONS[i % 8]), NEW_TOKENS)
            for i in range(count)
        ]


async def poisson(url: str, models: list[str], rate: float, count: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600, limits=FRESH_CONNECTIONS) as client:
        tasks = []
        for i in range(count):
            tasks.append(
                asyncio.create_task(
                    chat(client, url, models[i % len(models)], user(QUESTIONS[i % 8]), NEW_TOKENS)
                )
            )
            await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))


async def long_prompt(url: str, models: list[str]) -> dict[str, Any]:
    """7 streams decode 96 tokens; 1 s in, a 2,000-token prompt arrives. The streams' inter-token latency."""
    long_text = " ".join(f"Item {i}: the parcel left the depot." for i in range(250))
    async with httpx.AsyncClient(timeout=600, limits=FRESH_CONNECTIONS) as client:
        streams = [
            asyncio.create_task(chat(client, url, m, user(QUESTIONS[i]), 96))
            for i, m in enumerate(models[:7])
        ]
        await asyncio.sleep(1.0)
        intruder = await chat(client, url, models[0], user(long_text), 4)
        done = list(await asyncio.gather(*streams))
    itls = [t for r in done for t in r.itls]
    spread = percentiles(itls)
    return {
        "streams": summary(done),
        "long_prompt_ttft_s": intruder.ttft,
        "p99_over_median_itl": spread["p99"] / spread["p50"],
    }


async def system_prompt(url: str, adapter: str, other: str) -> dict[str, Any]:
    system = SYSTEM_SENTENCE * 32  # about 512 tokens

    def messages(i: int) -> list[dict[str, str]]:
        return [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % 8]}]

    same = await sequential(url, adapter, 16, messages)
    [elsewhere] = await sequential(url, other, 1, messages)
    later = statistics.median(r.ttft for r in same[1:])
    return {
        "first_ttft_s": same[0].ttft,
        "later_ttft_median_s": later,
        "later_over_first": later / same[0].ttft,
        "other_adapter_ttft_s": elsewhere.ttft,
    }


# -- transformers + PEFT -----------------------------------------------------------------------------------


def peft_generate(model_dir: Path, adapters: list[Path], with_adapters: bool) -> dict[str, Any]:
    """PEFT's mixed-batch generate() on the 8 chat prompts (left-padded), timed end to end."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = [f"lora{i}" for i in range(NUM_ADAPTERS)]
    if with_adapters:
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
        for name, path in zip(names[1:], adapters[1:], strict=True):
            model.load_adapter(path, adapter_name=name)
    texts = [
        tokenizer.apply_chat_template(user(q), tokenize=False, add_generation_prompt=True) for q in QUESTIONS
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs: dict[str, Any] = {"adapter_names": names} if with_adapters else {}
    generate = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    with torch.inference_mode():
        model.generate(**batch, **generate, **kwargs)  # warm-up
        started = time.perf_counter()
        out = model.generate(**batch, **generate, **kwargs)
        seconds = time.perf_counter() - started
    tokens = (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]
    return {"generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


# -- the run -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_serving", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of single, base8 and lora8")
    parser.add_argument("--rates", default="1,2,4", help="Poisson arrival rates, requests/s")
    parser.add_argument("--poisson-requests", type=int, default=18)
    parser.add_argument("--server-args", default="", help="extra `adapterd serve` flags, space-separated")
    parser.add_argument(
        "--versus",
        help="flags of a second server (A/B): single, base8 and lora8 rounds alternate between them",
    )
    parser.add_argument(
        "--llama-cpp",
        type=Path,
        help="a llama.cpp source tree with build/bin/llama-server (docs/performance.md): run it side by side "
        "on the same model (F32 GGUF) and LoRAs, in turns with adapterd",
    )
    parser.add_argument("--llama-cpp-threads", type=int, default=2, help="llama-server -t")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument(
        "--cases", default="single,base8,lora8,poisson,system,long", help="which server cases to run"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results-serving.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from adapterd.server.common.config import default_cache_dir
    from adapterd.server.model.resolve import resolve_model

    from . import llama_cpp
    from .adapters import write_loras

    model_dir = resolve_model("default", default_cache_dir()).path
    results: dict[str, Any] = {"server_args": args.server_args, "new_tokens": NEW_TOKENS}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        paths = write_loras(root / "adapters", model_dir, NUM_ADAPTERS, RANK)
        ids = [p.name for p in paths]
        process, url = start_server(root / "store", root / "server.log", args.server_args.split())
        versus = None
        if args.versus is not None:
            versus = start_server(root / "store-b", root / "server-b.log", args.versus.split())
            results["versus"] = {"server_args": args.versus}
        peer = None
        if args.llama_cpp is not None:
            peer = llama_cpp.start(
                args.llama_cpp, model_dir, paths, root / "llama-cpp", args.llama_cpp_threads
            )
            PEER_BODY[peer.url] = peer.body
            results["llama_cpp"] = {"server_args": peer.args}
        try:
            targets = [(results, url)] + ([(results["versus"], versus[1])] if versus else [])
            for _, target_url in targets:
                for adapter_id, path in zip(ids, paths, strict=True):
                    upload(target_url, adapter_id, path)
            targets += [(results["llama_cpp"], peer.url)] if peer else []
            for _, target_url in targets:
                asyncio.run(concurrent(target_url, ids))  # warm-up: every adapter in its slot
            base = httpx.get(f"{url}/info").json()["model_id"]
            cases = set(args.cases.split(","))
            workloads = {
                "single": lambda u: sequential(u, ids[0], 4),
                "base8": lambda u: concurrent(u, [base] * 8),
                "lora8": lambda u: concurrent(u, ids),
            }
            for _ in range(args.rounds):  # with --versus, the two servers take turns: same machine state
                for case, workload in workloads.items():
                    for into, target_url in targets if case in cases else ():
                        into.setdefault(case, []).append(summary(asyncio.run(workload(target_url))))
            if "poisson" in cases:
                mix = [base, *ids]
                results["poisson"] = {
                    rate: summary(asyncio.run(poisson(url, mix, float(rate), args.poisson_requests, seed=1)))
                    for rate in args.rates.split(",")
                }
            if "system" in cases:
                results["system"] = asyncio.run(system_prompt(url, ids[1], ids[2]))
            if "long" in cases:
                results["long"] = asyncio.run(long_prompt(url, ids))
        finally:
            for server in [process] + ([versus[0]] if versus else []) + ([peer.process] if peer else []):
                server.terminate()
                server.wait(timeout=60)
        if not args.skip_peft:
            results["peft_lora8"] = peft_generate(model_dir, paths, with_adapters=True)
            results["peft_base8"] = peft_generate(model_dir, paths, with_adapters=False)
    print_report(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def _rate(rounds: list[dict[str, Any]]) -> str:
    values = sorted(r["tokens_per_s"] for r in rounds)
    return f"{values[0]:.1f}-{values[-1]:.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def print_report(results: dict[str, Any]) -> None:
    print(f"\ngenerated tokens/s end to end, {NEW_TOKENS} new tokens per request (rounds: min-max)")
    print_cases(results)
    if "versus" in results:
        print(f"versus `adapterd serve {results['versus']['server_args']}` (rounds taken in turns):")
        print_cases(results["versus"])
    if "llama_cpp" in results:
        print(f"llama.cpp `llama-server {results['llama_cpp']['server_args']}` (rounds taken in turns):")
        print_cases(results["llama_cpp"])
    for case in ("peft_base8", "peft_lora8"):
        if case in results:
            print(
                f"  {case:<8} {results[case]['tokens_per_s']:>12.1f} tok/s   (transformers + PEFT generate())"
            )
    if "peft_lora8" in results and "lora8" in results and "base8" in results:
        best = max(r["tokens_per_s"] for r in results["lora8"])
        base = max(r["tokens_per_s"] for r in results["base8"])
        print(
            f"  lora8 / PEFT mixed batch: {best / results['peft_lora8']['tokens_per_s']:.2f}x (target >= 3)"
        )
        print(f"  lora8 / base8 on adapterd: {best / base:.2f}x (target >= 0.8)")
    if "poisson" in results:
        print("poisson arrivals (rate req/s: tok/s, TTFT p50/p99, ITL p50/p99, e2e p50 in s)")
    for rate, s in results.get("poisson", {}).items():
        print(
            f"  {rate:>4}: {s['tokens_per_s']:6.1f} tok/s  TTFT {s['ttft_s']['p50']:.3f}/{s['ttft_s']['p99']:.3f}"
            f"  ITL {s['itl_s']['p50']:.3f}/{s['itl_s']['p99']:.3f}  e2e {s['e2e_s']['p50']:.2f}"
        )
    if "system" in results:
        print_system(results["system"])
    if "long" in results:
        print_long(results["long"])


def print_cases(results: dict[str, Any]) -> None:
    for case in ("single", "base8", "lora8"):
        if case not in results:
            continue
        rounds = results[case]
        itl = statistics.median(r["itl_s"]["p50"] for r in rounds) * 1000
        ttft = statistics.median(r["ttft_s"]["p50"] for r in rounds) * 1000
        print(f"  {case:<8} {_rate(rounds):>12} tok/s   TTFT p50 {ttft:6.0f} ms   ITL p50 {itl:5.1f} ms")


def print_system(system: dict[str, Any]) -> None:
    print(
        f"system prompt (512 tokens, 16 requests on one LoRA): first TTFT {system['first_ttft_s']:.3f} s, later median "
        f"{system['later_ttft_median_s']:.3f} s = {system['later_over_first']:.2f}x (target <= 0.25); "
        f"another LoRA {system['other_adapter_ttft_s']:.3f} s"
    )


def print_long(long: dict[str, Any]) -> None:
    print(
        f"2,000-token prompt among 7 streams: streams' ITL p99/p50 = {long['p99_over_median_itl']:.1f}x (target <= 3), "
        f"its TTFT {long['long_prompt_ttft_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
