"""Evaluation scores: exact match after trimming whitespace, ROUGE-1/2/L F1 on Unicode words, budgets."""

from __future__ import annotations

import pytest

from adapterd.server.trainer.data import Example
from adapterd.server.trainer.evaluate import MAX_NEW_TOKENS, score, token_budget


def test_identical_and_disjoint_answers() -> None:
    perfect = score([" 07.03.2024\n"], ["07.03.2024"])
    assert perfect.to_dict() == {
        "exact_match": 1.0,
        "rouge1": 1.0,
        "rouge2": 1.0,
        "rougeL": 1.0,
        "num_examples": 1,
    }
    wrong = score(["nothing alike"], ["07.03.2024"])
    assert (wrong.exact_match, wrong.rouge1, wrong.rouge2, wrong.rougeL) == (0.0, 0.0, 0.0, 0.0)


def test_partial_overlap_is_f1_averaged_over_examples() -> None:
    partial = score(["the cat"], ["the cat sat"])  # P 1, R 2/3 for unigrams and the LCS; bigrams P 1, R 1/2
    assert partial.exact_match == 0.0
    assert partial.rouge1 == pytest.approx(0.8) and partial.rougeL == pytest.approx(0.8)
    assert partial.rouge2 == pytest.approx(2 / 3)
    mean = score(["the cat", "x"], ["the cat sat", "x"])
    assert mean.exact_match == 0.5 and mean.rouge1 == pytest.approx(0.9)
    assert score(["Sat cat the"], ["the cat sat"]).rougeL == pytest.approx(1 / 3)  # order matters for LCS


def test_words_of_any_script_count() -> None:
    assert score(["привет"], ["привет мир"]).rouge1 == pytest.approx(2 / 3)
    assert score(["Café"], ["café"]).rouge1 == 1.0


def test_the_budget_covers_the_reference_with_a_margin() -> None:
    assert token_budget(Example(1, "07.03.2024", prompt="p")) == 10 + 16
    assert token_budget(Example(1, "x" * 10_000, prompt="p")) == MAX_NEW_TOKENS
