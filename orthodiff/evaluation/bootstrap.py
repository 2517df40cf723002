"""Patient bootstrap by resampling weights.

A bootstrap resample of n patients is a vector of counts (how often each patient was drawn),
so every replicate's metric is the point metric with those counts as sample weights. Computing
all replicates at once from a (replicates, patients) count matrix is exact and takes
milliseconds, where calling a metric once per replicate takes seconds per label and subgroup.
The point estimates themselves come from torchmetrics; tests check these weighted forms equal
torchmetrics on expanded resamples.
"""

from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95


def resample_counts(n_units: int, n_replicates: int, seed: int) -> np.ndarray:
    """(n_replicates, n_units) draw counts of a bootstrap over ``n_units`` patients, seeded."""
    rng = np.random.default_rng(seed)
    if n_units == 0:
        return np.zeros((n_replicates, 0))
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_replicates).astype(float)


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, int]:
    """(low, high, replicates used): the percentile interval over the defined replicates."""
    valid = replicates[np.isfinite(replicates)]
    if valid.size == 0:
        return float("nan"), float("nan"), 0
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(valid, [tail, 100.0 - tail])
    return float(low), float(high), int(valid.size)


def _tie_groups(sorted_scores: np.ndarray) -> np.ndarray:
    """Start index of each run of equal scores in a sorted array."""
    return np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])


def weighted_auroc(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC per row of ``weights`` (Mann-Whitney with ties counted half); NaN without both classes."""
    order = np.argsort(scores, kind="stable")
    starts = _tie_groups(scores[order])
    positive = targets[order].astype(bool)
    w = weights[:, order]
    pos = np.add.reduceat(w * positive, starts, axis=1)
    neg = np.add.reduceat(w * ~positive, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(1) * neg.sum(1)
    concordant = (pos * (neg_below + 0.5 * neg)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, concordant / pairs, np.nan)


def weighted_average_precision(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (step sum over distinct thresholds) per row of ``weights``; NaN without positives."""
    order = np.argsort(-scores, kind="stable")
    starts = _tie_groups(scores[order])
    positive = targets[order].astype(bool)
    w = weights[:, order]
    pos = np.add.reduceat(w * positive, starts, axis=1)
    neg = np.add.reduceat(w * ~positive, starts, axis=1)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        total = pos.sum(1)
        return np.where(total > 0, (pos * precision).sum(1) / total, np.nan)


def weighted_rate(hits: np.ndarray, eligible: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted fraction of ``eligible`` units that are ``hits`` (sensitivity, specificity); NaN when none."""
    denominator = weights @ eligible.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (weights @ (hits & eligible).astype(float)) / denominator, np.nan)


def calibration_bins(scores: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each score, as torchmetrics bins it (a score of exactly 1 gets its own last bin)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges, scores, side="right") - 1


def weighted_calibration_error(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray, n_bins: int) -> np.ndarray:
    """Expected calibration error (L1 over reliability bins) per row of ``weights``."""
    bins = calibration_bins(scores, n_bins)
    one_hot = np.zeros((scores.size, n_bins + 1))
    one_hot[np.arange(scores.size), bins] = 1.0
    gap = weights @ (one_hot * (scores - targets.astype(float))[:, None])  # per bin: sum(prob) - sum(target)
    total = weights.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.abs(gap).sum(1) / total, np.nan)


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of per-patient ``values`` (NaN entries left out) per row of ``weights``."""
    known = np.isfinite(values)
    filled = np.where(known, values, 0.0)
    denominator = weights @ known.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (weights @ filled) / denominator, np.nan)


def seed_and_patient_replicates(per_seed: np.ndarray, seed_counts: np.ndarray) -> np.ndarray:
    """Replicates of a mean over seeds that resample the seeds as well as the patients.

    ``per_seed`` (S, R): each seed's metric on the R patient resamples; ``seed_counts`` (R, S): how
    often each seed is drawn in replicate r (``resample_counts(S, R, ...)``). Replicate r is the
    count-weighted mean of the drawn seeds' values on patient resample r, so the interval holds the
    spread between seeds (label subsets, initialisations) beside the test-set uncertainty. A seed
    undefined on a resample (NaN) is left out of that replicate.
    """
    values = np.asarray(per_seed, dtype=float).T  # (R, S)
    known = np.isfinite(values)
    weights = np.where(known, seed_counts, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weights.sum(1) > 0, (weights * np.where(known, values, 0.0)).sum(1) / weights.sum(1), np.nan)
