"""Logits shaping from first principles: logit bias, min_tokens, presence and frequency penalties, and the
structured-output mask touches only its own row; a row left with nothing to draw may draw end-of-sequence."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import Constraint, SamplingParams, constraint, sampling_params
from adapterd.server.engine.detokenizer import Detokenizer
from adapterd.server.engine.logits_processors import shape_logits
from adapterd.server.engine.messages import SinkOutbox
from adapterd.server.engine.sequence import Sequence

VOCAB = 70  # not a multiple of 32: the mask's last word is partial
EOS = 2


class AllowOnly:
    """A stand-in matcher that allows a fixed set of tokens, in llguidance's bitmask layout."""

    def __init__(self, *allowed: int) -> None:
        self.allowed = allowed

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        for token in self.allowed:
            word, bit = divmod(token, 32)
            bitmask[row, word] |= torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32)


def seq(params: SamplingParams, output: list[int] | None = None, grammar: Any = None) -> Sequence:
    s = Sequence(
        "r", [1, 3, 4], params, SinkOutbox(lambda e: None), Detokenizer(None, [], ()), grammar=grammar
    )
    s.output_ids = list(output or [])
    return s


def logits(rows: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(rows))


GRAMMAR = SamplingParams(constraint=Constraint("regex", "x"))


def test_the_mask_touches_only_its_own_row() -> None:
    raw = logits(3)
    seqs = [seq(SamplingParams()), seq(GRAMMAR, grammar=AllowOnly(5, 33, 69)), seq(SamplingParams())]
    shaped = shape_logits(raw, seqs, {EOS})
    assert torch.equal(shaped[0], raw[0]) and torch.equal(shaped[2], raw[2])
    assert torch.isfinite(shaped[1]).nonzero().flatten().tolist() == [5, 33, 69]
    assert torch.equal(shaped[1, [5, 33, 69]], raw[1, [5, 33, 69]])


def test_plain_rows_come_back_as_the_same_tensor() -> None:
    raw = logits(2)
    assert shape_logits(raw, [seq(SamplingParams()), seq(SamplingParams(temperature=0.7))], {EOS}) is raw


def test_logit_bias_adds_exactly() -> None:
    raw = logits(1)
    shaped = shape_logits(raw, [seq(SamplingParams(logit_bias=((7, 5.0), (9, -100.0))))], {EOS})[0]
    expected = raw[0].clone()
    expected[7] += 5.0
    expected[9] -= 100.0
    assert torch.equal(shaped, expected)


@pytest.mark.parametrize(("generated", "held"), [(0, True), (2, True), (3, False)])
def test_min_tokens_holds_back_eos_and_stop_tokens(generated: int, held: bool) -> None:
    params = SamplingParams(min_tokens=3, stop_token_ids=(11,))
    shaped = shape_logits(logits(1), [seq(params, [20] * generated)], {EOS})[0]
    assert (shaped[[EOS, 11]] == float("-inf")).all() == held
    ignoring = shape_logits(logits(1), [seq(SamplingParams(min_tokens=3, ignore_eos=True))], {EOS})[0]
    assert torch.isfinite(ignoring[EOS])  # with ignore_eos, end-of-sequence is not special


def test_presence_and_frequency_penalties_follow_their_definition() -> None:
    raw = logits(1)
    output = [5, 5, 5, 8]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    shaped = shape_logits(raw, [seq(params, output)], {EOS})[0]
    expected = raw[0].clone()
    expected[5] -= 0.5 + 0.25 * 3
    expected[8] -= 0.5 + 0.25 * 1
    assert torch.allclose(shaped, expected)  # prompt tokens (1, 3, 4) are not penalised


def test_a_row_left_with_nothing_to_draw_may_draw_only_eos() -> None:
    # The grammar allows only the end, which min_tokens holds back: the grammar wins.
    params = SamplingParams(min_tokens=5, constraint=Constraint("regex", "x"))
    shaped = shape_logits(logits(1), [seq(params, grammar=AllowOnly(EOS))], {EOS})[0]
    assert torch.isfinite(shaped).nonzero().flatten().tolist() == [EOS]


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"logit_bias": ((1, 100.5),)}, "logit_bias"),
        ({"min_tokens": 65}, "min_tokens"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
    ],
)
def test_out_of_range_options_name_their_field(values: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        sampling_params(**values)
    assert raised.value.param == says


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("json_schema", "not json"),
        ("json_schema", [1]),
        ("choice", []),
        ("choice", ["a", ""]),
        ("regex", ""),
        ("grammar", 3),
    ],
)
def test_constraints_of_the_wrong_shape_are_refused(kind: Any, value: Any) -> None:
    with pytest.raises(InvalidRequest) as raised:
        constraint(kind, value, "the.field")
    assert raised.value.param == "the.field"
