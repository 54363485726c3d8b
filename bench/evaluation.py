"""python -m bench.evaluation: the base and 8 LoRA adapters on one multiple-choice task, three ways, one run.

1. adapterd's lm-eval backend (in-process engine), one adapter alone;
2. the same backend, the base and 8 adapters fanned out through one continuous batch (`adapterd eval`);
3. eight sequential `lm-eval --model hf --model_args pretrained=...,peft=...` runs (each loads the model).

The task is local and synthetic (40 questions, 4 choices: 160 log-likelihood requests per model); adapters are
random rank-16 LoRAs on all seven linears of the default model. Prints a table, writes bench/results-eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adapterd.server.common.config import default_cache_dir
from adapterd.server.model.resolve import resolve_model

from .adapters import write_loras

TASK = "bench_mc"
NUM_ADAPTERS = 8
RANK = 16
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def write_task(root: Path, num_docs: int) -> Path:
    rng = random.Random(0)
    lines = []
    for _ in range(num_docs):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        choices = [str(a + b), str(a + b + rng.randint(1, 9)), str(abs(a - b)), str(a * b)]
        order = list(range(4))
        rng.shuffle(order)
        lines.append(
            {
                "question": f"What is {a} plus {b}?",
                "choices": [choices[i] for i in order],
                "answer": order.index(0),
            }
        )
    (root / "mc.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=root / "mc.jsonl"))
    return root


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.evaluation", description=__doc__)
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--hf-batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results-eval.json"))
    args = parser.parse_args(argv)
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from adapterd.server.evaluation.backends import LocalBackend
    from adapterd.server.evaluation.compare import compare
    from adapterd.server.host.llm import LLM

    model_dir = resolve_model("default", default_cache_dir()).path
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        root = Path(tmp)
        task_dir = write_task(root, args.docs)
        paths = write_loras(root / "adapters", model_dir, NUM_ADAPTERS, RANK)
        ids = [p.name for p in paths]
        with LLM(model=str(model_dir), quantize="none", device="cpu") as llm:
            for path in paths:
                llm.add_adapter(path.name, path)
            one, one_s = timed(
                lambda: compare(LocalBackend(llm), [TASK], ids[:1], False, include_path=task_dir)
            )
            many, many_s = timed(lambda: compare(LocalBackend(llm), [TASK], ids, True, include_path=task_dir))
        manager = TaskManager(include_path=str(task_dir))
        hf_acc: dict[str, float] = {}

        def hf_runs() -> None:
            for path in paths:
                out = lm_eval.simple_evaluate(
                    model="hf",
                    model_args=f"pretrained={model_dir},peft={path},dtype=float32,device=cpu",
                    tasks=[TASK],
                    task_manager=manager,
                    batch_size=args.hf_batch_size,
                )
                hf_acc[path.name] = out["results"][TASK]["acc,none"]

        _, hf_s = timed(hf_runs)
    rows = [
        ("adapterd backend, 1 adapter", 1, one_s),
        (f"adapterd backend, base + {NUM_ADAPTERS} adapters, one batch", NUM_ADAPTERS + 1, many_s),
        (
            f"{NUM_ADAPTERS} sequential lm-eval hf + peft runs (batch {args.hf_batch_size})",
            NUM_ADAPTERS,
            hf_s,
        ),
    ]
    print(f"\n{args.docs} documents x 4 choices, torch threads {torch.get_num_threads()}")
    print(f"{'case':<60} {'models':>6} {'seconds':>8}")
    for name, models, seconds in rows:
        print(f"{name:<60} {models:>6} {seconds:>8.1f}")
    print(f"base + {NUM_ADAPTERS} vs 1 adapter: {many_s / one_s:.2f}x the time (target <= 2)")
    print(f"{NUM_ADAPTERS} hf runs vs base + {NUM_ADAPTERS} on adapterd: {hf_s / many_s:.2f}x (target >= 4)")
    same = all(abs(many.results[i][TASK]["acc,none"] - hf_acc[i]) < 1e-9 for i in ids)
    print(f"accuracies equal to lm-eval hf + peft for every adapter: {same}")
    results = {
        "docs": args.docs,
        "cases": [{"case": n, "models": m, "seconds": s} for n, m, s in rows],
        "ratio_many_vs_one": many_s / one_s,
        "ratio_hf_vs_many": hf_s / many_s,
        "accuracies": {m: r[TASK]["acc,none"] for m, r in many.results.items()},
        "hf_accuracies": hf_acc,
        "efficiency": many.efficiency,
        "one_adapter_accuracy": one.results[ids[0]][TASK]["acc,none"],
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
