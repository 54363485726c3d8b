"""Expected calibration error of a multiple-choice task (HELM's calibration metric), from lm-eval's samples:
each document's choice probabilities are the softmax of its choices' log-likelihoods; the confidence is the
top one, and ECE is the bin-weighted mean |accuracy - confidence| over equal-width confidence bins."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

NUM_BINS = 10


def expected_calibration_error(samples: Sequence[dict[str, Any]], num_bins: int = NUM_BINS) -> float | None:
    """ECE of lm-eval multiple-choice samples (`filtered_resps`: one (loglikelihood, is_greedy) per choice,
    `target`: the gold index); None when they are not multiple-choice samples."""
    points = [p for p in (_confidence(s) for s in samples) if p is not None]
    if not points:
        return None
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(num_bins)]
    for confidence, correct in points:
        bins[min(int(confidence * num_bins), num_bins - 1)].append((confidence, correct))
    return sum(
        len(b) / len(points) * abs(sum(c for _, c in b) / len(b) - sum(p for p, _ in b) / len(b))
        for b in bins
        if b
    )


def _confidence(sample: dict[str, Any]) -> tuple[float, bool] | None:
    responses, target = sample.get("filtered_resps"), sample.get("target")
    if not isinstance(target, int) or not isinstance(responses, list) or len(responses) < 2:
        return None
    try:
        scores = [float(r[0]) for r in responses]
    except (TypeError, ValueError, IndexError):
        return None
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    best = scores.index(top)
    return weights[best] / sum(weights), best == target
