"""The studies a fine-tuning run sees: which split each is in, its labels, EHR and planes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import OrthodiffError
from ..planes import PLANES


@dataclass
class RunStudies:
    """Studies of the run's patients (training subset, val, test), one row each, sorted by study_id."""

    frame: object  # DataFrame: study_id, patient_id, split, site, field_strength, label_<name>...
    labels: np.ndarray  # (N, L) float32, NaN unknown
    ehr: np.ndarray  # (N, E) float32, standardised on the training studies
    present: np.ndarray  # (N, 3) bool, PLANES order
    label_names: list
    ehr_names: list

    def where(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.frame["split"].to_numpy() == split)


def run_patients(splits, labels_fraction: float) -> dict[str, list]:
    """Patient ids per split for a run: the nested training subset of ``labels_fraction``."""
    if not 0 < float(labels_fraction) <= 1:
        raise OrthodiffError(f"finetune.labels_fraction={labels_fraction}: must be in (0, 1]")
    train = splits.subset(float(labels_fraction))
    if not train:
        raise OrthodiffError(f"finetune.labels_fraction={labels_fraction}: the subset has no training patient")
    for name in ("val", "test"):
        if not getattr(splits, name):
            raise OrthodiffError(f"{splits.path}: the {name} split is empty; write splits with a positive {name}_fraction")
    # model selection sees the same share of the validation labels as training does
    return {"train": list(train), "val": splits.val_subset(float(labels_fraction)), "test": list(splits.test)}


def resolve_labels(cache, wanted: Sequence[str], source: str) -> list[str]:
    """``data.labels`` (each must be a label of the prepared data) or all of them."""
    from ..data.manifest import check_labels

    labels = check_labels(cache.index, list(wanted) or None, source)
    if not labels:
        raise OrthodiffError(f"{source}: the prepared data has no label_ columns; scan the archive with its labels.csv")
    return labels


def load_run_studies(cache, patients: dict[str, list], labels: list[str], ehr_columns: Sequence[str]) -> RunStudies:
    """Labels, EHR (standardised with the training studies' statistics) and plane presence, without
    reading any image."""
    import pandas as pd

    from ..data.datasets import StudyDataset

    train = StudyDataset(cache, patients["train"], labels=labels, ehr_columns=ehr_columns)
    everyone = [p for split in ("train", "val", "test") for p in patients[split]]
    dataset = StudyDataset(cache, everyone, labels=labels, ehr_columns=ehr_columns, ehr_stats=train.ehr_stats)
    split_of = {p: split for split in ("train", "val", "test") for p in patients[split]}
    rows, ehr, present = [], [], []
    for study_id in dataset.study_ids:
        # StudyDataset's per-study metadata row and EHR encoding, so probes and fine-tuning agree.
        row = dataset.study_row(study_id)
        rows.append(
            {
                "study_id": study_id,
                "patient_id": str(row["patient_id"]),
                "split": split_of[str(row["patient_id"])],
                "site": row.get("site", ""),
                "field_strength": row.get("field_strength", np.nan),
                **{f"label_{n}": pd.to_numeric(row[f"label_{n}"], errors="coerce") for n in labels},
            }
        )
        ehr.append(dataset.encode_ehr(row).numpy())
        present.append([dataset.series_of(study_id, plane) is not None for plane in PLANES])
    frame = pd.DataFrame(rows)
    label_values = np.array(frame[[f"label_{n}" for n in labels]].to_numpy(dtype=np.float32))
    return RunStudies(
        frame=frame,
        labels=label_values,
        ehr=np.asarray(ehr, dtype=np.float32).reshape(len(rows), -1),
        present=np.asarray(present, dtype=bool).reshape(len(rows), len(PLANES)),
        label_names=list(labels),
        ehr_names=list(dataset.ehr_names),
    )
