"""``orthodiff split``: patient-level train/val/test and nested label-fraction subsets, written once.

The patient is the unit: every study of a patient lies in one split. Splits and subsets are
multi-label stratified (iterative stratification) on the study labels aggregated per patient
(a patient is positive for a label when any of their studies is). The file is written once and
reused, so every experiment of a project sees the same patients.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OrthodiffError
from ..fileio import read_json, write_json
from .fingerprint import data_fingerprint

SPLITS_FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Splits:
    """Patient ids per split, and nested subsets of the training patients per label fraction."""

    train: list
    val: list
    test: list
    subsets: dict  # fraction (float) -> list of training patient ids
    labels: list
    seed: int
    warnings: list = field(default_factory=list)
    path: Path | None = None
    fingerprint: str | None = None  # of the manifest it was made from (see data.fingerprint)
    manifest: str = ""
    # fraction -> nested subset of the validation patients: model selection at a label fraction sees
    # that share of the validation labels only (empty in files written before they existed)
    val_subsets: dict = field(default_factory=dict)

    def subset(self, fraction: float) -> list:
        """Training patients of the ``fraction`` subset (1.0: all of them)."""
        for key, patients in self.subsets.items():
            if abs(float(key) - float(fraction)) < 1e-9:
                return list(patients)
        available = ", ".join(f"{key:g}" for key in sorted(self.subsets, reverse=True))
        raise OrthodiffError(
            f"labels fraction {fraction:g} is not in {self.path or 'the splits'} (available: {available}); "
            "add it to data.label_fractions and write a new splits file"
        )

    def val_subset(self, fraction: float) -> list:
        """Validation patients model selection may see at ``fraction`` (all of them at 1.0, or when
        the file has no validation subsets)."""
        for key, patients in self.val_subsets.items():
            if abs(float(key) - float(fraction)) < 1e-9:
                return list(patients)
        return list(self.val)

    def split_of(self, patient_id: str) -> str:
        for name in SPLIT_NAMES:
            if patient_id in getattr(self, name):
                return name
        raise OrthodiffError(f"patient {patient_id!r} is in none of the splits of {self.path or 'this splits file'}")

    def patients(self, split: str) -> list:
        if split not in SPLIT_NAMES:
            raise OrthodiffError(f"split {split!r}: use one of {', '.join(SPLIT_NAMES)}")
        return list(getattr(self, split))

    def describe(self) -> str:
        total = len(self.train) + len(self.val) + len(self.test)
        subsets = ", ".join(f"{key:.0%}: {len(value)}" for key, value in sorted(self.subsets.items(), reverse=True))
        text = (
            f"{total} patients split (seed {self.seed}): train {len(self.train)}, val {len(self.val)}, "
            f"test {len(self.test)}; training subsets by label fraction {subsets}; "
            f"stratified on {len(self.labels)} labels"
        )
        if self.path:
            text += f"; written to {self.path}"
        text += "."
        if self.warnings:
            text += " Warnings: " + " ".join(self.warnings)
        return text


def patient_labels(frame, labels: list[str]):
    """One row per patient (sorted ids): 1 when any study of the patient is positive, else 0."""
    import pandas as pd

    columns = [f"label_{name}" for name in labels]
    studies = frame.drop_duplicates("study_id")
    if not columns:
        return pd.DataFrame(index=sorted(studies["patient_id"].astype(str).unique()))
    values = studies[columns].apply(pd.to_numeric, errors="coerce").fillna(0.0).gt(0.5).astype(int)
    values.index = studies["patient_id"].astype(str).values
    return values.groupby(level=0).max().sort_index()


def make_splits(
    manifest,
    out,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    fractions=(1.0, 0.5, 0.25, 0.1, 0.05),
    labels: list[str] | None = None,
) -> Splits:
    """Write (or reuse) the splits file ``out`` for the patients of ``manifest`` (path or DataFrame)."""
    import pandas as pd

    from .manifest import check_labels, read_manifest

    source = "manifest" if isinstance(manifest, pd.DataFrame) else str(manifest)
    frame = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    labels = check_labels(frame, list(labels) if labels else None, source)
    fractions = _check_fractions(fractions)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise OrthodiffError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in [0, 1) and their sum below 1"
        )
    per_patient = patient_labels(frame, labels)
    patients = list(per_patient.index)
    fingerprint = data_fingerprint(frame)
    if len(patients) < 3 and (val_fraction > 0 or test_fraction > 0):
        raise OrthodiffError(f"{source}: only {len(patients)} patient(s); train/val/test needs at least 3")
    settings = {
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "labels": labels,
        "patients_sha256": _patients_hash(patients),
        "n_patients": len(patients),
    }
    out = Path(out)
    if out.exists():
        existing = load_splits(out)
        _check_reusable(out, read_json(out)["settings"], settings, fractions)
        if existing.fingerprint and existing.fingerprint != fingerprint:
            raise OrthodiffError(
                f"{out}: splits file exists but was made from another manifest ({existing.manifest or 'unknown'}, "
                f"data fingerprint {existing.fingerprint[:12]} vs {fingerprint[:12]} of {source}); delete it to "
                "split anew or give another --out path"
            )
        return existing

    y = per_patient.to_numpy()
    test = _stratified_pick(patients, y, _count(test_fraction, len(patients)), seed)
    rest = [p for p in patients if p not in set(test)]
    y_rest = per_patient.loc[rest].to_numpy()
    val = _stratified_pick(rest, y_rest, _count(val_fraction, len(patients)), seed + 1)
    train = [p for p in rest if p not in set(val)]
    subsets = nested_subsets(train, per_patient.loc[train], fractions, seed)
    val_subsets = nested_subsets(val, per_patient.loc[val], fractions, seed + 50)
    notes = _missing_positive_warnings(per_patient, labels, {"val": val, "test": test})
    for note in notes:
        warnings.warn(note, stacklevel=2)

    splits = Splits(
        train=sorted(train),
        val=sorted(val),
        test=sorted(test),
        subsets={f: sorted(p) for f, p in subsets.items()},
        labels=labels,
        seed=int(seed),
        warnings=notes,
        path=out,
        fingerprint=fingerprint,
        manifest=source,
        val_subsets={f: sorted(p) for f, p in val_subsets.items()},
    )
    write_json(
        out,
        {
            "format_version": SPLITS_FORMAT_VERSION,
            "manifest": source,
            "manifest_fingerprint": fingerprint,
            "settings": settings,
            "train": splits.train,
            "val": splits.val,
            "test": splits.test,
            "subsets": {f"{key:g}": value for key, value in splits.subsets.items()},
            "val_subsets": {f"{key:g}": value for key, value in splits.val_subsets.items()},
            "label_positives": {
                name: {
                    split: int(per_patient.loc[getattr(splits, split), f"label_{name}"].sum()) for split in SPLIT_NAMES
                }
                for name in labels
            },
            "warnings": notes,
        },
    )
    _assert_consistent(splits, out)
    return splits


def load_splits(path) -> Splits:
    """Read a splits file and check that no patient is in two splits and subsets are nested."""
    path = Path(path)
    if not path.exists():
        raise OrthodiffError(f"{path}: splits file not found; write it with `orthodiff split MANIFEST --out {path}`")
    try:
        data = read_json(path)
        splits = Splits(
            train=list(data["train"]),
            val=list(data["val"]),
            test=list(data["test"]),
            subsets={float(key): list(value) for key, value in data["subsets"].items()},
            labels=list(data["settings"]["labels"]),
            seed=int(data["settings"]["seed"]),
            warnings=list(data.get("warnings", [])),
            path=path,
            fingerprint=data.get("manifest_fingerprint"),
            manifest=str(data.get("manifest", "")),
            val_subsets={float(key): list(value) for key, value in data.get("val_subsets", {}).items()},
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise OrthodiffError(
            f"{path}: not a splits file written by `orthodiff split` ({exc}); delete it and rerun"
        ) from exc
    _assert_consistent(splits, path)
    return splits


# --------------------------------------------------------------------------- helpers


def _check_fractions(fractions) -> list[float]:
    try:
        values = sorted({round(float(f), 6) for f in fractions} | {1.0}, reverse=True)
    except (TypeError, ValueError):
        raise OrthodiffError(f"data.label_fractions={fractions!r}: expected numbers in (0, 1]") from None
    if any(not 0 < f <= 1 for f in values):
        raise OrthodiffError(f"data.label_fractions={list(fractions)}: each must be in (0, 1]")
    return values


def _patients_hash(patients: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(patients)).encode()).hexdigest()


def _count(fraction: float, n: int) -> int:
    """Patients for a split of ``fraction``: at least one when the fraction is positive."""
    return 0 if fraction <= 0 else max(1, int(round(fraction * n)))


def _stratified_pick(patients: list, y: np.ndarray, n: int, seed: int) -> list:
    """``n`` of ``patients`` chosen by multi-label stratification on ``y`` (seeded)."""
    if n <= 0:
        return []
    if n >= len(patients):
        return list(patients)
    rng_seed = int(seed) % (2**32)
    if y.shape[1] == 0 or y.sum() == 0:
        order = np.random.RandomState(rng_seed).permutation(len(patients))
        return [patients[i] for i in sorted(order[:n])]
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    # a "no label positive" column stratifies normal exams too, and keeps one label multi-label
    y = np.hstack([y, (y.sum(axis=1) == 0)[:, None]]).astype(int)
    splitter = MultilabelStratifiedShuffleSplit(
        n_splits=1, test_size=n, train_size=len(patients) - n, random_state=rng_seed
    )
    _, picked = next(splitter.split(np.zeros((len(patients), 1)), y))
    # iterative stratification hits the size only roughly; trim or top up at random to exactly n
    rng = np.random.RandomState(rng_seed)
    picked = list(rng.permutation(sorted(picked)))
    others = list(rng.permutation(sorted(set(range(len(patients))) - set(picked))))
    picked = (picked + others)[:n]
    return [patients[i] for i in sorted(picked)]


def nested_subsets(train: list, y_train, fractions: list[float], seed: int) -> dict:
    """Each fraction's subset is drawn, stratified, from the next larger one, and holds exactly
    round(fraction x len(train)) patients: a label the parent has but the draw lacks gets a positive
    swapped in for a patient the other labels can spare, never added."""
    subsets = {}
    parent = list(train)
    for step, fraction in enumerate(fractions):
        n = max(1, int(round(fraction * len(train)))) if train else 0
        chosen = _stratified_pick(parent, y_train.loc[parent].to_numpy(), n, seed + 100 + step)
        subsets[fraction] = _with_every_label(chosen, parent, y_train, seed + step)
        parent = subsets[fraction]
    return subsets


def _with_every_label(chosen: list, parent: list, y_train, seed: int) -> list:
    """Swap a positive patient (from ``parent``) in for any label the parent has but ``chosen`` lacks.

    The patient swapped out is one whose removal leaves no label without a positive, so the size
    never changes; a label is left uncovered only when no such patient exists (more labels than
    patients).
    """
    chosen = list(chosen)
    rng = np.random.RandomState(int(seed) % (2**32))
    for column in y_train.columns:
        if y_train.loc[chosen, column].sum() > 0 or y_train.loc[parent, column].sum() == 0:
            continue
        positives = sorted(p for p in parent if y_train.loc[p, column] > 0 and p not in chosen)
        counts = y_train.loc[chosen].sum(axis=0)
        # spare: every label this patient is positive for has another positive in the subset
        spare = [p for p in chosen if ((y_train.loc[p] > 0) <= (counts > 1)).all()]
        if not spare:
            continue
        chosen.remove(spare[rng.randint(len(spare))])
        chosen.append(positives[rng.randint(len(positives))])
    return chosen


def _missing_positive_warnings(per_patient, labels: list[str], splits: dict) -> list[str]:
    """One note per split that lacks a positive patient for some labels (their AUROC is undefined there)."""
    notes = []
    for split, patients in splits.items():
        if not patients:
            continue
        lacking = [name for name in labels if per_patient.loc[patients, f"label_{name}"].sum() == 0]
        if lacking:
            names = ", ".join(repr(name) for name in lacking)
            notes.append(f"{split} has no positive patient for label(s) {names}: their AUROC there is undefined.")
    return notes


def _check_reusable(path: Path, stored: dict, wanted: dict, fractions: list[float]) -> None:
    """Reuse only a file made from the same patients and settings; say what differs otherwise."""
    differ = [key for key in wanted if stored.get(key) != wanted[key]]
    if differ:
        names = ", ".join("patients" if key in ("patients_sha256", "n_patients") else key for key in differ)
        raise OrthodiffError(
            f"{path}: splits file exists but was made with other {names}; delete it to split anew "
            "(every experiment on the old splits then changes) or give another --out path"
        )
    stored_fractions = {round(float(key), 6) for key in read_json(path)["subsets"]}
    missing = [f for f in fractions if f not in stored_fractions]
    if missing:
        raise OrthodiffError(
            f"{path}: splits file has no subsets for label fractions {missing}; delete it or give another --out path"
        )


def _assert_consistent(splits: Splits, path) -> None:
    """No patient in two splits; each subset inside the training patients and inside every larger subset."""
    seen = {}
    for name in SPLIT_NAMES:
        for patient in getattr(splits, name):
            if patient in seen:
                raise OrthodiffError(
                    f"{path}: patient {patient!r} is in both {seen[patient]} and {name}; "
                    "the splits file is corrupt, delete it and rerun `orthodiff split`"
                )
            seen[patient] = name
    _check_nested(path, splits.train, splits.subsets, "training")
    _check_nested(path, splits.val, splits.val_subsets, "validation")


def _check_nested(path, split: list, subsets: dict, name: str) -> None:
    """Each label-fraction subset of ``split`` lies inside the next larger one and inside the split."""
    larger = set(split)
    for fraction in sorted(subsets, reverse=True):
        members = set(subsets[fraction])
        if not members <= larger:
            raise OrthodiffError(
                f"{path}: the {fraction:g} {name} subset holds patients outside the larger subset or the {name} "
                "split; delete the file and rerun `orthodiff split`"
            )
        larger = members
