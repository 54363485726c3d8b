"""register_if read from a job's metrics: lm-eval's metric keys, the held-out scores, and a delta equal to
min_delta passing despite floating point (0.5 - 0.4 is 0.09999999999999998)."""

from __future__ import annotations

import pytest

from adapterd.server.trainer.gate import GateError, decide

GSM = {
    "exact_match,strict-match": 0.4,
    "exact_match,flexible-extract": 0.5,
    "exact_match_stderr,strict-match": 0.1,
}


def metrics(base: dict[str, float], adapter: dict[str, float]) -> dict[str, object]:
    held_out = {"exact_match": 0.0, "rouge1": 0.5, "rouge2": 0.2, "rougeL": 0.4, "num_examples": 4}
    return {"base": held_out, "adapter": held_out, "tasks": {"base": {"t": base}, "adapter": {"t": adapter}}}


def test_a_metric_named_alone_or_with_its_filter() -> None:
    both = metrics({"acc,none": 0.4, "acc_norm,none": 0.3}, {"acc,none": 0.5, "acc_norm,none": 0.3})
    outcome = decide({"task": "t", "metric": "acc", "min_delta": 0.1}, both)
    assert outcome["metric"] == "acc,none" and outcome["passed"] and outcome["delta"] == pytest.approx(0.1)
    assert not decide({"task": "t", "metric": "acc_norm,none", "min_delta": 0.0001}, both)["passed"]
    assert decide({"task": "t", "metric": "acc_norm", "min_delta": -0.01}, both)["passed"]


def test_several_filters_must_be_told_apart() -> None:
    gsm = metrics(GSM, GSM)
    with pytest.raises(GateError, match="several filters"):
        decide({"task": "t", "metric": "exact_match", "min_delta": 0.0}, gsm)
    assert decide({"task": "t", "metric": "exact_match,strict-match", "min_delta": 0.0}, gsm)["passed"]


def test_the_held_out_scores() -> None:
    outcome = decide({"task": "held_out", "metric": "rougeL", "min_delta": 0.0}, metrics({}, {}))
    assert outcome["base"] == outcome["adapter"] == 0.4 and outcome["passed"]


def test_train_submit_flags_make_the_gate() -> None:
    from adapterd.clients.cli_train import job_config
    from adapterd.server.cli.main import build_parser

    line = ["train", "submit", "--data", "d.jsonl", "--adapter-id", "a", "--method", "lora"]
    args = build_parser("train").parse_args(
        [*line, "--eval-tasks", "my_task,arc_easy", "--register-if", "my_task:exact_match,strict-match:0.02"]
    )
    config = job_config(args)
    assert config["eval_tasks"] == ["my_task", "arc_easy"]
    assert config["register_if"] == {
        "task": "my_task",
        "metric": "exact_match,strict-match",
        "min_delta": 0.02,
    }
    with pytest.raises(SystemExit):
        job_config(build_parser("train").parse_args([*line, "--register-if", "my_task:acc:lots"]))
