"""`adapterd run`'s JSONL lines: the structured-output and newer sampling fields, and their refusals."""

from __future__ import annotations

import json

import pytest

from adapterd.server.cli.offline import parse_line
from adapterd.server.common.protocol import Constraint


def line(**fields: object) -> str:
    return json.dumps({"id": 1, "prompt": "Hi", **fields})


def test_the_newer_fields_reach_the_sampling_parameters() -> None:
    params = parse_line(
        line(logit_bias={"5": -3}, min_tokens=2, stop_token_ids=[7], presence_penalty=0.5, ignore_eos=True)
    ).request.params
    assert (params.logit_bias, params.min_tokens, params.stop_token_ids) == (((5, -3.0),), 2, (7,))
    assert params.presence_penalty == 0.5 and params.ignore_eos
    assert parse_line(line(regex="[0-9]+")).request.params.constraint == Constraint(
        "regex", "[0-9]+", "regex"
    )
    assert parse_line(line(choice=["a", "b"])).request.params.constraint == Constraint(
        "choice", '["a", "b"]', "choice"
    )
    assert parse_line(line(json_object=False)).request.params.constraint is None


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"regex": "a", "choice": ["b"]}, "not several"),
        ({"logit_bias": {"x": 1}}, "not a token id"),
        ({"stop_token_ids": [1.5]}, "list of token ids"),
        ({"json_schema": [1]}, "JSON schema"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ],
)
def test_bad_fields_are_refused_naming_them(fields: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_line(line(**fields))
