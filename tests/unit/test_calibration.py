"""Expected calibration error, checked against a hand computation."""

from __future__ import annotations

import math

import pytest

from adapterd.server.evaluation.calibration import expected_calibration_error


def sample(probabilities: list[float], target: int) -> dict:
    return {"filtered_resps": [(math.log(p), False) for p in probabilities], "target": target}


def test_ece_is_the_bin_weighted_gap_between_accuracy_and_confidence():
    # confidence 0.9 and right (bin 9: gap 0.1); 0.6 and wrong (bin 6: gap 0.6); 0.65 and right (bin 6 too:
    # accuracy 1/2, confidence 0.625, gap 0.125). ECE = 1/3 * 0.1 + 2/3 * 0.125.
    samples = [sample([0.9, 0.1], 0), sample([0.6, 0.4], 1), sample([0.35, 0.65], 1)]
    assert expected_calibration_error(samples) == pytest.approx(0.1 / 3 + 2 / 3 * 0.125)


def test_log_likelihoods_are_normalised_over_the_choices():
    # unnormalised log-likelihoods (continuations of different lengths): only their differences count
    shifted = {"filtered_resps": [(-10 + math.log(0.9), True), (-10 + math.log(0.1), False)], "target": 0}
    assert expected_calibration_error([shifted]) == pytest.approx(0.1)


def test_generation_samples_have_no_ece():
    assert expected_calibration_error([{"filtered_resps": ["Paris"], "target": "Paris"}]) is None
