"""Scores that steer and summarise a run: AUROC per label (patient level), macro over the
labels where it is defined, Dice for segmentation. An undefined AUROC is a recorded warning that
names the label and split, never a silent NaN."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def patient_level(frame, labels: Sequence[str]):
    """One row per (split, patient): mean of the studies' probabilities; a label is positive when
    any study is, unknown when all are."""
    prob = {f"prob_{n}": "mean" for n in labels}
    target = {f"label_{n}": "max" for n in labels}
    grouped = frame.groupby(["split", "patient_id"], sort=True).agg({**prob, **target, "study_id": "count"})
    return grouped.rename(columns={"study_id": "n_studies"}).reset_index()


def auroc_scores(frame, labels: Sequence[str], split: str) -> tuple[dict, float | None, list[str]]:
    """({label: AUROC or None}, macro over defined labels or None, warnings) on one split's rows."""
    from sklearn.metrics import roc_auc_score

    rows = frame[frame["split"] == split]
    scores, warnings = {}, []
    for name in labels:
        target = rows[f"label_{name}"].to_numpy(dtype=float)
        prob = rows[f"prob_{name}"].to_numpy(dtype=float)
        known = np.isfinite(target)
        positives, negatives = int((target[known] == 1).sum()), int((target[known] == 0).sum())
        if positives == 0 or negatives == 0:
            missing = "positive" if positives == 0 else "negative"
            warnings.append(
                f"label {name!r} has no {missing} patient in {split}: AUROC undefined, left out of the {split} macro AUROC"
            )
            scores[name] = None
            continue
        scores[name] = float(roc_auc_score(target[known], prob[known]))
    defined = [v for v in scores.values() if v is not None]
    macro = float(np.mean(defined)) if defined else None
    return scores, macro, warnings


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> list[float | None]:
    """Dice of classes 1..K-1 on one volume; None where a class is in neither volume."""
    scores = []
    for label in range(1, num_classes):
        p, t = pred == label, target == label
        total = int(p.sum()) + int(t.sum())
        scores.append(None if total == 0 else 2.0 * int((p & t).sum()) / total)
    return scores


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed as it is written (a training log)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, **record) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=_plain) + "\n")


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)
