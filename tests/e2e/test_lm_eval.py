"""EleutherAI's lm-evaluation-harness, unmodified, scores adapters through adapterd exactly as it scores them
in-process: `lm_eval --model local-completions` against a real server gives the same per-choice
log-likelihoods (within 1e-3 nats, fp32 CPU) and the same accuracy as `--model hf` with `peft=`, for a LoRA,
a prompt-tuning adapter and the base, on a small local multiple-choice task (datasets cannot be downloaded
here; lm-eval loads `dataset_path: json` with local files offline).

A server that returned log-probabilities for generated tokens only would make lm-eval score chance with no
error; comparing every choice's log-likelihood is what rules that out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapterd.server.model.resolve import ResolvedModel
from tests.e2e.serving import Server, serving_adapters
from tests.reference import make_lora_adapter, make_prompt_adapter

pytestmark = pytest.mark.slow
TASK = "adapterd_mc"
LM_EVAL = str(Path(sys.executable).with_name("lm_eval"))
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("What colour is the sky on a clear day?", ["green", "blue", "red", "brown"], 1),
    ("How many legs does a dog have?", ["two", "six", "four", "eight"], 2),
    ("Which animal says moo?", ["cat", "dog", "duck", "cow"], 3),
    ("What do bees make?", ["honey", "milk", "silk", "wool"], 0),
    ("What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
    ("What is two plus two?", ["three", "five", "six", "four"], 3),
    ("Which season is the coldest?", ["winter", "summer", "spring", "autumn"], 0),
    ("What do you use to write on paper?", ["a spoon", "a pen", "a shoe", "a cup"], 1),
]
GEN_TASK = "adapterd_gen"
GEN_QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What colour is grass?", "Green"),
    ("How many days are in a week?", "Seven"),
    ("What is the opposite of hot?", "Cold"),
    ("Which animal barks?", "A dog"),
    ("What do cows drink?", "Water"),
]
UNTIL = ["\n", "."]
MAX_GEN_TOKS = 12
GEN_TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    regexes_to_ignore: [" "]
    ignore_case: true
"""
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
target_delimiter: " "
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval-task")
    data = root / "mc.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS)
    )
    (root / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    gen_data = root / "gen.jsonl"
    gen_data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GEN_QUESTIONS))
    gen_yaml = GEN_TASK_YAML.format(task=GEN_TASK, data=gen_data, max_gen_toks=MAX_GEN_TOKS)
    (root / f"{GEN_TASK}.yaml").write_text(gen_yaml)
    return root


@pytest.fixture(scope="module")
def adapters(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm-eval-adapters")
    base = default_model.path
    return {
        "lora": make_lora_adapter(base, root / "lora", r=8, alpha=16, target_modules="all-linear", seed=4),
        "soft": make_prompt_adapter(base, root / "soft", num_virtual_tokens=8, seed=5),
    }


@pytest.fixture(scope="module")
def server(default_model: ResolvedModel, adapters: dict[str, Path], tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("lm-eval-server")
    with serving_adapters(default_model.path, adapters, root) as running:
        yield running


def hf_scores(model_dir: Path, adapter: Path | None, task_dir: Path) -> tuple[float, list[list[float]]]:
    """lm-eval's own in-process scoring: transformers, plus PEFT when `adapter` is given."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = f"pretrained={model_dir},dtype=float32,device=cpu" + (f",peft={adapter}" if adapter else "")
    os.environ.update(OFFLINE)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        batch_size=1,
    )
    return _accuracy(results["results"]), _choice_scores(results["samples"][TASK])


def served_scores(
    server: Server, model: str, tokenizer: Path, task_dir: Path, out: Path
) -> tuple[float, list]:
    """The documented command: `lm_eval --model local-completions` pointed at the server."""
    model_args = (
        f"model={model},base_url={server.url}/v1/completions,tokenizer={tokenizer},"
        "tokenized_requests=True,num_concurrent=4,max_retries=1"
    )
    command = [LM_EVAL, "--model", "local-completions", "--model_args", model_args, "--tasks", TASK]
    command += ["--include_path", str(task_dir), "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [
        json.loads(line) for line in next(out.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()
    ]
    return _accuracy(results["results"]), _choice_scores(samples)


def _accuracy(results: dict[str, Any]) -> float:
    return float(results[TASK]["acc,none"])


def _choice_scores(samples: list[dict[str, Any]]) -> list[list[float]]:
    """Per document (in doc order), each choice's log-likelihood."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in ordered]


@pytest.fixture(scope="module")
def hf_reference(default_model, adapters, task_dir) -> dict[str, tuple[float, list[list[float]]]]:
    """lm-eval's `hf` model (+ `peft=`) on the task, by adapter ("" the base)."""
    return {a: hf_scores(default_model.path, adapters.get(a), task_dir) for a in ("", "lora", "soft")}


def max_difference(rows: list[list[float]], expected: list[list[float]]) -> float:
    assert [len(row) for row in rows] == [len(row) for row in expected] == [len(c) for _, c, _ in QUESTIONS]
    return max(abs(a - b) for r, e in zip(rows, expected, strict=True) for a, b in zip(r, e, strict=True))


@pytest.mark.parametrize("adapter", ["", "lora", "soft"])
def test_local_completions_scores_like_hf_with_peft(
    server, default_model, hf_reference, task_dir, tmp_path, adapter
):
    model = adapter or _base_name(server)
    served_acc, served = served_scores(server, model, default_model.path, task_dir, tmp_path / "out")
    hf_acc, expected = hf_reference[adapter]
    difference = max_difference(served, expected)
    print(
        f"\nlm-eval local-completions {adapter or 'base'}: acc {served_acc:.3f}, hf acc {hf_acc:.3f}, "
        f"max |loglikelihood difference| {difference:.2e} nats"
    )
    assert difference < 1e-3
    assert served_acc == hf_acc


def test_the_adapterd_backend_scores_all_models_in_one_pass_like_hf(
    default_model, adapters, hf_reference, task_dir
):
    """lm-eval's tasks on adapterd's in-process engine: the base and both adapters fanned out together."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from adapterd.server.evaluation.backends import LocalBackend
    from adapterd.server.evaluation.harness import AdapterdLM
    from adapterd.server.llm import LLM

    models = [None, "lora", "soft"]
    with LLM(model=str(default_model.path), quantize="none", device="cpu") as llm:
        for name, path in adapters.items():
            llm.add_adapter(name, path)
        backend, cache = LocalBackend(llm), {}
        for model in models:
            lm = AdapterdLM(backend, model, fan_out=models, cache=cache)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True
            )
            if model is None:  # the first run answered every model's requests
                assert len(cache) == len(models) * sum(len(c) for _, c, _ in QUESTIONS)
            hf_acc, expected = hf_reference[model or ""]
            difference = max_difference(_choice_scores(out["samples"][TASK]), expected)
            acc = _accuracy(out["results"])
            print(
                f"\nadapterd backend {model or 'base'}: acc {acc:.3f}, hf acc {hf_acc:.3f}, "
                f"max |loglikelihood difference| {difference:.2e} nats"
            )
            assert difference < 1e-3
            assert acc == hf_acc


def _base_name(server: Server) -> str:
    import httpx

    return str(httpx.get(server.url + "/info").json()["model_id"])


def test_generation_tasks_answer_pefts_greedy_text(default_model, adapters, task_dir):
    """generate_until through the in-process engine (all models fanned out) gives PEFT's greedy answers, cut
    at the task's `until` (prompt tuning: PEFT's forward passes, not its generate())."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from adapterd.server.evaluation.backends import LocalBackend
    from adapterd.server.evaluation.harness import AdapterdLM
    from adapterd.server.llm import LLM
    from tests.reference import greedy_forward, load_base, load_peft

    tokenizer = AutoTokenizer.from_pretrained(default_model.path)
    models = [None, "lora", "soft"]
    answers: dict[str | None, list[str]] = {}
    with LLM(model=str(default_model.path), quantize="none", device="cpu") as llm:
        for name, path in adapters.items():
            llm.add_adapter(name, path)
        backend, cache = LocalBackend(llm), {}
        manager = TaskManager(include_path=str(task_dir))
        for model in models:
            lm = AdapterdLM(backend, model, fan_out=models, cache=cache)
            out = lm_eval.simple_evaluate(model=lm, tasks=[GEN_TASK], task_manager=manager, log_samples=True)
            samples = sorted(out["samples"][GEN_TASK], key=lambda s: s["doc_id"])
            answers[model] = [s["resps"][0][0] for s in samples]
    for model in models:
        reference = (
            load_base(default_model.path) if model is None else load_peft(default_model.path, adapters[model])
        )
        for (question, _), answer in zip(GEN_QUESTIONS, answers[model], strict=True):
            ids = tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False).input_ids
            text = tokenizer.decode(
                greedy_forward(reference, ids, MAX_GEN_TOKS, tokenizer.eos_token_id), skip_special_tokens=True
            )
            for stop in UNTIL:
                text = text.split(stop)[0]
            assert answer == text, (model, question)
    assert answers[None] != answers["lora"]  # the adapters change the answers: the comparison means something


def run_eval(*args: str) -> subprocess.CompletedProcess[str]:
    adapterd = str(Path(sys.executable).with_name("adapterd"))
    env = {**os.environ, **OFFLINE}
    return subprocess.run([adapterd, "eval", *args], capture_output=True, text=True, timeout=600, env=env)


def test_adapterd_eval_compares_models_through_a_server(
    server, default_model, hf_reference, task_dir, tmp_path
):
    common = ["--server", server.url, "--tokenizer", str(default_model.path), "--include-path", str(task_dir)]
    done = run_eval(
        "--tasks", f"{TASK},{GEN_TASK}", "--adapters", "lora,soft", "--base", *common, "--out", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    header = done.stdout.splitlines()[0].split()
    assert header == ["task", "metric", "base", "lora", "soft"]
    assert "acc,none" in done.stdout and "exact_match,none" in done.stdout and "±" in done.stdout
    for task in (TASK, GEN_TASK):  # one chart per task, PNG and SVG
        assert (tmp_path / f"{task}.png").read_bytes().startswith(b"\x89PNG")
        assert "<svg" in (tmp_path / f"{task}.svg").read_text()
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for model, adapter in (("base", ""), ("lora", "lora"), ("soft", "soft")):
        assert results[model][TASK]["acc,none"] == hf_reference[adapter][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "no_such_task"], "no_such_task"),
        (["--tasks", TASK, "--adapters", "no-such-adapter"], "no-such-adapter"),
        (["--tasks", "broken"], "broken"),
    ],
)
def test_adapterd_eval_refuses_clearly(server, default_model, task_dir, tmp_path, args, message):
    include = tmp_path / "tasks"
    shutil.copytree(task_dir, include)
    (include / "broken.yaml").write_text("task: broken\noutput_type: [not, a, type\n")
    common = ["--server", server.url, "--tokenizer", str(default_model.path), "--include-path", str(include)]
    done = run_eval(*args, *common)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr
