"""Train a tiny LoRA adapter with PEFT, upload it to a running adapterd server, and query it over HTTP and
gRPC, with and without the adapter.

    pip install 'adapterd[server]'          # torch, transformers and peft, for the training half
    adapterd serve &                        # the default model, SmolLM2-135M-Instruct, on :8080 and :50051
    python examples/train_upload_query.py   # --url, --grpc-target and --base-model to point elsewhere

The adapter learns one fact the base model cannot know (the secret word), so the answers with and
without it differ visibly. Training takes well under a minute on a CPU. Querying needs only the plain
`pip install adapterd`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterd.clients import Client, GrpcClient

ADAPTER_ID = "secret-word"
PROMPTS = ["The secret word is", "Tell me the secret word:", "Secret word:", "What is the secret word? It is"]
COMPLETION = " pineapple."


def train_lora(base_model: Path, out_dir: Path, steps: int = 30, learning_rate: float = 3e-3) -> Path:
    """LoRA (r=8 on q_proj and v_proj) trained to complete every prompt of PROMPTS with COMPLETION."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
    )
    model = get_peft_model(model, config)
    input_ids, labels = batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    for step in range(1, steps + 1):
        loss = model(
            input_ids=input_ids, attention_mask=input_ids != tokenizer.pad_token_id, labels=labels
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    model.save_pretrained(out_dir)  # adapter_config.json + adapter_model.safetensors
    return out_dir


def batch(tokenizer: AutoTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+completion ids; the loss covers only the completion's tokens."""
    rows = [(tokenizer(p).input_ids, tokenizer(COMPLETION).input_ids) for p in PROMPTS]
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (prompt, completion) in enumerate(rows):
        ids = prompt + completion
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(prompt) : len(ids)] = torch.tensor(completion)
    return input_ids, labels


def default_base_model() -> Path:
    """The converted directory of `adapterd serve`'s default model (what the server runs)."""
    from adapterd.server.common.config import default_cache_dir
    from adapterd.server.model.resolve import resolve_model

    return resolve_model("default", default_cache_dir()).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the server's HTTP URL")
    parser.add_argument("--grpc-target", default="127.0.0.1:50051", help="the server's gRPC host:port")
    parser.add_argument("--base-model", type=Path, help="HF directory of the server's base model")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = train_lora(args.base_model or default_base_model(), Path(tmp) / ADAPTER_ID, args.steps)
        with Client(args.url) as http, GrpcClient(args.grpc_target) as grpc:
            adapter = http.upload_adapter(ADAPTER_ID, adapter_dir)
            print(
                f"uploaded {adapter.id} v{adapter.version} ({adapter.size_bytes} bytes, rank {adapter.rank})"
            )
            for transport, client in (("http", http), ("grpc", grpc)):
                for adapter_id in (None, ADAPTER_ID):
                    answer = client.generate(PROMPTS[0], adapter_id, max_new_tokens=6)
                    print(
                        f"{transport:4}  {adapter_id or 'base':11}  {PROMPTS[0]}{answer.text!r}  {answer.token_ids}"
                    )
            print("grpc  streamed     ", end="")
            for token in grpc.generate_stream(PROMPTS[1], ADAPTER_ID, max_new_tokens=6):
                print(token.text, end="", flush=True)
            print()


if __name__ == "__main__":
    main()
