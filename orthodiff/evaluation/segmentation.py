"""Segmentation metrics per structure: Dice and 95% Hausdorff distance (mm, at the plane tensor's
spacing) with MONAI, averaged per patient, then over patients with a patient-bootstrap interval.

A structure absent from the target has no Dice or HD95 for that series (left out, counted as
``n_absent``); a structure present in the target but not predicted has Dice 0 and no HD95
(counted as ``n_missed``). An unreadable or mismatched prediction is listed and skipped.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import bootstrap
from .classification import estimate, undefined

_META = ("series_id", "study_id", "patient_id", "split", "site", "field_strength", "plane")


def structure_names(classes: list, segmentations: pd.DataFrame) -> list[str]:
    """Foreground class names from run.json, or ``class_<k>`` up to the largest value in the masks."""
    if classes:
        return [str(c) for c in classes[1:]]
    largest = 0
    for column in ("pred", "target"):
        for path in segmentations[column]:
            if Path(path).exists():
                largest = max(largest, int(np.load(path, mmap_mode="r").max()))
    return [f"class_{k}" for k in range(1, largest + 1)]


def series_scores(segmentations: pd.DataFrame, structures: list[str],
                  distances: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """One row per readable series with ``dice_<s>`` and (with ``distances``) ``hd95_<s>``; and the
    skipped series with reasons. Surface distances cost most of the time: a caller that pools Dice
    only leaves them out."""
    from monai.metrics import DiceMetric, compute_hausdorff_distance  # MONAI is slow to import: only here
    from monai.networks.utils import one_hot

    num_classes = len(structures) + 1
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    rows, skipped = [], []
    for record in segmentations.to_dict("records"):
        try:
            pred, target = _load_pair(record, num_classes)
        except ValueError as exc:
            skipped.append({"series_id": record["series_id"], "reason": str(exc)})
            continue
        pred_1h = one_hot(torch.from_numpy(pred.astype(np.int64))[None, None], num_classes)
        target_1h = one_hot(torch.from_numpy(target.astype(np.int64))[None, None], num_classes)
        dice = dice_metric(y_pred=pred_1h, y=target_1h)[0].numpy()
        dice_metric.reset()
        hd95 = None
        if distances:
            with warnings.catch_warnings():  # empty structures are expected; recorded as n_absent / n_missed
                warnings.simplefilter("ignore")
                hd95 = compute_hausdorff_distance(pred_1h, target_1h, include_background=False, percentile=95,
                                                  spacing=list(record["spacing"]))[0].numpy()
        row = {key: record[key] for key in _META}
        for k, name in enumerate(structures):
            present = bool(target_1h[0, k + 1].any())
            row[f"dice_{name}"] = float(dice[k]) if present else np.nan
            if hd95 is not None:
                row[f"hd95_{name}"] = float(hd95[k]) if present and np.isfinite(hd95[k]) else np.nan
            row[f"absent_{name}"] = not present
            row[f"missed_{name}"] = present and not bool(pred_1h[0, k + 1].any())
        rows.append(row)
    return pd.DataFrame(rows), skipped


def _load_pair(record: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for column in ("pred", "target"):
        path = Path(record[column])
        if not path.exists():
            raise ValueError(f"{path}: {column} file not found")
        array = np.load(path)
        if array.ndim != 3:
            raise ValueError(f"{path}: expected a (D, H, W) label array, got shape {array.shape}")
        if array.size and (array.min() < 0 or array.max() >= num_classes):
            raise ValueError(f"{path}: label values outside 0..{num_classes - 1} (run.json classes)")
        arrays.append(array)
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"pred shape {arrays[0].shape} differs from target shape {arrays[1].shape}")
    return arrays[0], arrays[1]


def segmentation_metrics(scores: pd.DataFrame, structures: list[str], n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Per-structure and mean Dice and HD95 over patients (each patient = mean of its series)."""
    per_patient = scores.groupby("patient_id", sort=True)
    patients = np.array(sorted(scores["patient_id"].unique()), dtype=str)
    counts = bootstrap.resample_counts(patients.size, n_bootstrap, seed)
    result = {"n_patients": int(patients.size), "n_series": len(scores), "structures": {}}
    replicates = {"dice": {}, "hd95_mm": {}}
    for name in structures:
        entry = {"n_series": int((~scores[f"absent_{name}"]).sum()), "n_absent": int(scores[f"absent_{name}"].sum()),
                 "n_missed": int(scores[f"missed_{name}"].sum())}
        for metric, column in (("dice", f"dice_{name}"), ("hd95_mm", f"hd95_{name}")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                values = per_patient[column].mean().reindex(patients).to_numpy(float)
            if not np.isfinite(values).any():
                reason = ("structure absent from every target" if metric == "dice"
                          else "no series where both target and prediction hold the structure")
                entry[metric] = undefined(reason)
                continue
            reps = bootstrap.weighted_mean(values, counts)
            entry[metric] = estimate(float(np.nanmean(values)), reps)
            replicates[metric][name] = reps
        result["structures"][name] = entry
    result["mean"] = _structure_mean(result["structures"], replicates, structures)
    thin = thin_structures(structures)
    result["thin_structures"] = thin
    result["thin_mean"] = (_structure_mean(result["structures"], replicates, thin) if thin else
                           {m: undefined("no cartilage, meniscus or ligament among the classes") for m in replicates})
    return result


def thin_structures(structures: list[str]) -> list[str]:
    """The thin structures among ``structures`` (cartilages, menisci, ligaments, tendons, labrum):
    a few voxels thick at plane-tensor size, so they are scored on their own beside the mean."""
    return [name for name in structures if any(word in name.lower() for word in THIN_WORDS)]


THIN_WORDS = ("cartilage", "menisc", "cruciate", "ligament", "tendon", "labrum", "atfl", "cfl")


def _structure_mean(entries: dict, replicates: dict, names: list[str]) -> dict:
    """Mean over ``names`` of the defined per-structure values, with the mean of their resamples."""
    out = {}
    for metric in ("dice", "hd95_mm"):
        defined = [name for name in names if entries[name][metric]["value"] is not None]
        if not defined:
            out[metric] = undefined("no structure has this metric defined")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            reps = np.nanmean(np.vstack([replicates[metric][name] for name in defined]), axis=0)
        out[metric] = estimate(float(np.mean([entries[name][metric]["value"] for name in defined])), reps)
    return out
