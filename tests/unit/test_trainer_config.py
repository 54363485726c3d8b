"""Job configs: defaults per method, the spec's names, and errors that name the field at fault (HTTP JSON
and the gRPC message alike)."""

from __future__ import annotations

from typing import Any

import pytest

from adapterd.server.trainer.config import ALL_LINEAR, JobConfig
from adapterd.server.trainer.errors import InvalidConfig
from adapterd.server.trainer.grpc_api import config_dict
from adapterd.v1 import training_pb2 as pb


def config(**values: Any) -> JobConfig:
    return JobConfig.from_dict({"adapter_id": "my-adapter", "method": "lora", **values})


def test_defaults_fill_every_hyper_parameter() -> None:
    lora = config()
    assert (lora.rank, lora.alpha, lora.target_modules) == (8, 16.0, ALL_LINEAR)
    assert (lora.epochs, lora.max_steps, lora.batch_size, lora.seed) == (3, None, 8, 0)
    assert lora.learning_rate == 1e-3
    prompt = config(method="prompt_tuning")
    assert prompt.learning_rate == 3e-2 and prompt.num_virtual_tokens == 20
    assert prompt.prompt_tuning_init_text is None
    assert config(method="qlora").is_ranked and config(method="dora").is_ranked and not prompt.is_ranked


def test_overrides_use_the_spec_names() -> None:
    job = config(
        rank=4,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        epochs=2,
        max_steps=50,
        learning_rate=5e-4,
        batch_size=4,
        max_seq_len=64,
        seed=7,
    )
    assert (job.rank, job.alpha, job.target_modules, job.max_steps) == (4, 8.0, ("q_proj", "v_proj"), 50)
    assert (job.learning_rate, job.batch_size, job.max_seq_len, job.seed) == (5e-4, 4, 64, 7)
    assert isinstance(job.alpha, float) and job.to_dict()["target_modules"] == ["q_proj", "v_proj"]
    assert JobConfig.from_dict(job.to_dict()) == job


def test_eval_tasks_and_the_gate() -> None:
    job = config(
        eval_tasks=["arc_easy", "my_task", "arc_easy"], register_if={"task": "my_task", "metric": "acc"}
    )
    assert job.eval_tasks == ("arc_easy", "my_task")
    assert job.register_if == {"task": "my_task", "metric": "acc", "min_delta": 0.0}
    assert JobConfig.from_dict(job.to_dict()) == job and job.to_dict()["eval_tasks"] == [
        "arc_easy",
        "my_task",
    ]
    held_out = config(register_if={"task": "held_out", "metric": "rougeL", "min_delta": -0.05})
    assert held_out.register_if == {"task": "held_out", "metric": "rougeL", "min_delta": -0.05}
    assert config().eval_tasks == () and config().register_if is None
    gate = pb.RegisterIf(task="my_task", metric="acc,none")  # min_delta 0, unset
    message = pb.JobConfig(adapter_id="a", method="lora", eval_tasks=["my_task"], register_if=gate)
    assert config_dict(message)["register_if"] == {"task": "my_task", "metric": "acc,none", "min_delta": 0.0}
    assert JobConfig.from_dict(config_dict(message)).eval_tasks == ("my_task",)


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        (
            {"method": "loha"},
            "method",
            "unknown method 'loha'; use one of lora, qlora, dora, ia3, prompt_tuning",
        ),
        ({"method": None}, "method", "is required"),
        ({"adapter_id": ""}, "adapter_id", "is required"),
        ({"adapter_id": "../etc"}, "adapter_id", "invalid adapter id"),
        ({"rank": 0}, "rank", "between 1 and 1024"),
        ({"rank": "8"}, "rank", "must be an integer"),
        ({"rank": 2.5}, "rank", "must be an integer"),
        ({"rank": True}, "rank", "must be an integer"),
        ({"learning_rate": -1}, "learning_rate", "between"),
        ({"learning_rate": float("nan")}, "learning_rate", "must be a number"),
        ({"batch_size": 0}, "batch_size", "between 1"),
        ({"max_steps": 0}, "max_steps", "between 1"),
        ({"epochs": 10_000}, "epochs", "between 1 and 1000"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules", "unknown module 'lm_head'"),
        ({"target_modules": "q_proj"}, "target_modules", "must be a list"),
        ({"prompt_tuning_init_text": 3}, "prompt_tuning_init_text", "must be a string"),
        ({"lora_dropout": 0.1}, "lora_dropout", "unknown field"),
        ({"eval_tasks": "arc_easy"}, "eval_tasks", "must be a list of lm-eval task names"),
        ({"eval_tasks": ["../x"]}, "eval_tasks", "'../x' is not a task name"),
        ({"eval_tasks": [f"t{i}" for i in range(65)]}, "eval_tasks", "at most 64"),
        ({"register_if": "acc"}, "register_if", "must be an object"),
        ({"register_if": {"task": "t", "metric": "acc"}}, "register_if.task", "held_out \\('held_out'\\)"),
        (
            {"eval_tasks": ["t"], "register_if": {"task": "u", "metric": "acc"}},
            "register_if.task",
            "'t', 'held_out'",
        ),
        ({"eval_tasks": ["t"], "register_if": {"task": "t"}}, "register_if.metric", "must name a metric"),
        ({"register_if": {"task": "held_out", "metric": "acc"}}, "register_if.metric", "exact_match, rouge1"),
        (
            {"eval_tasks": ["t"], "register_if": {"task": "t", "metric": "acc", "min_delta": "0.1"}},
            "register_if.min_delta",
            "must be a number",
        ),
        (
            {"register_if": {"task": "held_out", "metric": "rouge1", "by": 1}},
            "register_if.by",
            "unknown field",
        ),
    ],
)
def test_bad_values_name_the_field(values: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidConfig, match=message) as caught:
        config(**values)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"config.{field}: ")
    assert caught.value.http_status == 400 and caught.value.grpc_code == "INVALID_ARGUMENT"


def test_a_config_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidConfig, match=r"^config: the config must be a JSON object"):
        JobConfig.from_dict(["lora"])


def test_the_grpc_config_leaves_unset_fields_to_the_defaults() -> None:
    message = pb.JobConfig(adapter_id="a", method="prompt_tuning", num_virtual_tokens=8, learning_rate=0.1)
    assert config_dict(message) == {
        "adapter_id": "a",
        "method": "prompt_tuning",
        "num_virtual_tokens": 8,
        "learning_rate": 0.1,
    }
    job = JobConfig.from_dict(config_dict(message))
    assert job.num_virtual_tokens == 8 and job.learning_rate == 0.1 and job.epochs == 3
    lora = JobConfig.from_dict(
        config_dict(pb.JobConfig(adapter_id="a", method="lora", target_modules=["v_proj"]))
    )
    assert lora.target_modules == ("v_proj",)
    with pytest.raises(InvalidConfig, match=r"config\.method: is required"):
        JobConfig.from_dict(config_dict(pb.JobConfig(adapter_id="a")))
