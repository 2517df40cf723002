"""Diagnosis metrics per label and macro: AUROC, average precision, sensitivity and specificity at
validation-chosen thresholds, and calibration error, each with a 95% patient bootstrap interval.

Studies are aggregated to patients before any metric: a patient's probability is the mean of its
studies' probabilities and it is positive when any of its studies is (studies with an unknown label
are left out for that label). Patients are the unit of resampling, so a patient with two studies
counts once.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_calibration_error,
    binary_roc,
)

from . import bootstrap

N_BINS = 10
DEFAULT_THRESHOLD = 0.5


def patient_scores(frame: pd.DataFrame, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patient ids, mean probability, any-positive target) for the patients with a known ``label``."""
    known = frame[frame[f"label_{label}"].notna()]
    grouped = known.groupby("patient_id", sort=True)
    probs = grouped[f"prob_{label}"].mean()
    targets = grouped[f"label_{label}"].max()
    return probs.index.to_numpy(str), probs.to_numpy(float), targets.to_numpy(float).astype(int)


def undefined(reason: str) -> dict:
    """A metric that cannot be computed, with the reason; never a silent NaN."""
    return {"value": None, "reason": reason}


def estimate(point: float, replicates: np.ndarray) -> dict:
    """A point value with its percentile interval, rounded to 6 decimals (torchmetrics computes in
    float32, so a perfect AUROC can come back as 0.99999994 while the float64 resamples give 1)."""
    low, high, used = bootstrap.percentile_interval(replicates)
    if used == 0:
        return {"value": _round(point), "ci_low": None, "ci_high": None, "n_resamples": 0,
                "reason": "no bootstrap resample had both classes"}
    return {"value": _round(point), "ci_low": _round(low), "ci_high": _round(high), "n_resamples": used}


def _round(value: float) -> float:
    return round(float(value), 6)


def class_balance_reason(targets: np.ndarray) -> str | None:
    if targets.size == 0:
        return "no patients with a known label"
    if targets.sum() == 0:
        return "no positives"
    if targets.sum() == targets.size:
        return "no negatives"
    return None


def choose_thresholds(val_frame: pd.DataFrame, labels: list[str]) -> dict:
    """Per label, the threshold maximising Youden's J (sensitivity + specificity - 1) on validation
    patients; ``DEFAULT_THRESHOLD`` with the reason when validation cannot choose one."""
    chosen = {}
    for label in labels:
        _, scores, targets = patient_scores(val_frame, label)
        reason = class_balance_reason(targets)
        if reason is not None:
            chosen[label] = {"value": DEFAULT_THRESHOLD, "source": "default",
                             "reason": f"validation split: {reason}; used {DEFAULT_THRESHOLD}"}
            continue
        fpr, tpr, thresholds = binary_roc(torch.tensor(scores), torch.tensor(targets))
        youden = tpr - fpr
        best = int(torch.argmax(youden))
        chosen[label] = {"value": float(min(thresholds[best], 1.0)), "source": "val Youden J",
                         "youden_j": float(youden[best]), "n_val_patients": int(targets.size)}
    return chosen


def classification_metrics(
    frame: pd.DataFrame,
    labels: list[str],
    thresholds: dict,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Per-label and macro metrics with patient-bootstrap intervals for one split or subgroup."""
    patients = np.array(sorted(frame["patient_id"].unique()), dtype=str)
    counts = bootstrap.resample_counts(patients.size, n_bootstrap, seed)
    per_label, replicates = {}, {}
    for label in labels:
        ids, scores, targets = patient_scores(frame, label)
        weights = counts[:, np.searchsorted(patients, ids)]
        per_label[label], replicates[label] = _label_metrics(scores, targets, weights, thresholds[label]["value"])
    return {
        "n_patients": int(patients.size),
        "n_studies": len(frame),
        "labels": per_label,
        "macro": _macro(per_label, replicates),
    }


def _label_metrics(scores, targets, weights, threshold) -> tuple[dict, dict]:
    n_pos = int(targets.sum())
    result = {"n_patients": int(targets.size), "n_pos": n_pos, "n_neg": int(targets.size - n_pos)}
    reps = {}
    reason = class_balance_reason(targets)
    if reason is None:
        preds, target_t = torch.tensor(scores), torch.tensor(targets)
        reps["auroc"] = bootstrap.weighted_auroc(scores, targets, weights)
        reps["ap"] = bootstrap.weighted_average_precision(scores, targets, weights)
        result["auroc"] = estimate(float(binary_auroc(preds, target_t)), reps["auroc"])
        result["ap"] = estimate(float(binary_average_precision(preds, target_t)), reps["ap"])
    else:
        result["auroc"] = result["ap"] = undefined(reason)
    decided = scores >= threshold
    positive = targets.astype(bool)
    result["threshold"] = float(threshold)
    result["sensitivity"] = _rate(decided, positive, weights, "no positives")
    result["specificity"] = _rate(~decided, ~positive, weights, "no negatives")
    if targets.size:
        reps["ece"] = bootstrap.weighted_calibration_error(scores, targets, weights, N_BINS)
        point = binary_calibration_error(torch.tensor(scores), torch.tensor(targets), n_bins=N_BINS)
        result["ece"] = estimate(float(point), reps["ece"])
    else:
        result["ece"] = undefined("no patients with a known label")
    return result, reps


def _rate(hits: np.ndarray, eligible: np.ndarray, weights: np.ndarray, reason: str) -> dict:
    if not eligible.any():
        return undefined(reason)
    point = float((hits & eligible).sum() / eligible.sum())
    return estimate(point, bootstrap.weighted_rate(hits, eligible, weights))


def _macro(per_label: dict, replicates: dict) -> dict:
    """Mean over the labels where each metric is defined; the others are listed with their reason."""
    macro = {}
    for metric in ("auroc", "ap", "ece"):
        included = [name for name, m in per_label.items() if m[metric]["value"] is not None]
        excluded = {name: m[metric]["reason"] for name, m in per_label.items() if m[metric]["value"] is None}
        if not included:
            macro[metric] = undefined("no label has this metric defined")
        else:
            point = float(np.mean([per_label[name][metric]["value"] for name in included]))
            stacked = np.vstack([replicates[name][metric] for name in included])
            with warnings.catch_warnings():  # an all-NaN replicate is dropped by the interval
                warnings.simplefilter("ignore", RuntimeWarning)
                reps = np.nanmean(stacked, axis=0)
            macro[metric] = estimate(point, reps)
        macro[metric]["labels_included"] = included
        macro[metric]["labels_excluded"] = excluded
    return macro

