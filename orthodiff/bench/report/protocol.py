"""What a bench's splits can resolve: real patient counts and positives per label at every label
fraction, which labels have enough test positives to enter the headline macro, and whether the
low-label subset still holds enough positives of each headline label.

A label with fewer than ``MIN_TEST_POSITIVES`` positive test patients gives an AUROC whose interval
spans most of [0, 1]; averaging it into the macro would let one or two patients move the headline.
Such labels are named in the report and left out of the headline macro (they keep their own column).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIN_TEST_POSITIVES = 10
MIN_TEST_PATIENTS = 150  # about what it takes to resolve a 0.05 macro AUROC difference at these prevalences
MIN_TRAIN_POSITIVES = 10  # positives of each headline label in the low-label training subset
LOW_FRACTION = 0.1


@dataclass
class LabelCounts:
    """Patients and positive patients per label in test, and in the training and validation subsets
    of every label fraction (one seed's splits)."""

    labels: list
    test_patients: int
    test_positives: dict  # label -> positive test patients
    train: dict  # fraction -> {"patients": n, "positives": {label: n}}
    val: dict  # fraction -> {"patients": n, "positives": {label: n}}
    headline: list = field(default_factory=list)  # labels with enough test positives
    excluded: list = field(default_factory=list)  # labels left out of the headline macro

    def as_dict(self) -> dict:
        return {"labels": self.labels, "test_patients": self.test_patients, "test_positives": self.test_positives,
                "train": {f"{k:g}": v for k, v in self.train.items()},
                "val": {f"{k:g}": v for k, v in self.val.items()},
                "headline_labels": self.headline, "excluded_labels": self.excluded}


def label_counts(splits_path: Path, manifest: Path, min_test_positives: int = MIN_TEST_POSITIVES) -> LabelCounts:
    """Counts for the splits file ``splits_path`` of the manifest ``manifest``."""
    from ...data.manifest import read_manifest
    from ...data.splits import load_splits, patient_labels

    splits = load_splits(splits_path)
    per_patient = patient_labels(read_manifest(manifest), splits.labels)

    def positives(patients) -> dict:
        return {label: int(per_patient.loc[list(patients), f"label_{label}"].sum()) for label in splits.labels}

    fractions = sorted(splits.subsets, reverse=True)
    test = positives(splits.test)
    headline = [label for label in splits.labels if test[label] >= int(min_test_positives)]
    return LabelCounts(
        labels=list(splits.labels), test_patients=len(splits.test), test_positives=test,
        train={f: {"patients": len(splits.subset(f)), "positives": positives(splits.subset(f))} for f in fractions},
        val={f: {"patients": len(splits.val_subset(f)), "positives": positives(splits.val_subset(f))}
             for f in fractions},
        headline=headline, excluded=[label for label in splits.labels if label not in headline],
    )


def short_test_set(counts: LabelCounts, minimum: int = MIN_TEST_PATIENTS) -> list[str]:
    """One line when the test set holds fewer than ``minimum`` patients (empty when it holds enough)."""
    if counts.test_patients >= minimum:
        return []
    return [f"test set: {counts.test_patients} patients (protocol: at least {minimum}, to resolve a 0.05 macro "
            "AUROC difference)"]


def low_label_shortfalls(counts: LabelCounts, fraction: float = LOW_FRACTION,
                         minimum: int = MIN_TRAIN_POSITIVES) -> list[str]:
    """Headline labels whose ``fraction`` training subset holds fewer than ``minimum`` positives
    (empty when the protocol holds, or when the splits have no such fraction)."""
    subset = next((v for k, v in counts.train.items() if abs(k - fraction) < 1e-9), None)
    if subset is None:
        return []
    return [f"{label}: {subset['positives'][label]} positive(s) among the {subset['patients']} training "
            f"patients at {fraction:.0%} (protocol: at least {minimum})"
            for label in counts.headline if subset["positives"][label] < minimum]


def protocol_lines(counts: LabelCounts, shortfalls: list[str], min_test_positives: int = MIN_TEST_POSITIVES,
                   name: str = "") -> list[str]:
    """The report's protocol section: real counts per fraction and the headline labels. ``name`` tells
    apart the sections of one report (a joint, a scenario)."""
    lines = [f"## Protocol: patients and positives per label{f': {name}' if name else ''}", "",
             f"Test set: {counts.test_patients} patients. Headline macro over the labels with at least "
             f"{min_test_positives} positive test patients: {', '.join(counts.headline) or 'none'}."]
    if counts.excluded:
        lines.append("Left out of the headline macro (too few test positives to resolve): " + ", ".join(
            f"{label} ({counts.test_positives[label]})" for label in counts.excluded) + ".")
    lines += ["", "| split | fraction | patients | " + " | ".join(counts.labels) + " |",
              "|---|---|---|" + "---|" * len(counts.labels),
              "| test | - | " + f"{counts.test_patients} | "
              + " | ".join(str(counts.test_positives[label]) for label in counts.labels) + " |"]
    for split, table in (("train", counts.train), ("val", counts.val)):
        for fraction, entry in sorted(table.items(), reverse=True):
            lines.append(f"| {split} | {fraction:.0%} | {entry['patients']} | "
                         + " | ".join(str(entry["positives"][label]) for label in counts.labels) + " |")
    if shortfalls:
        lines += ["", "**Where the splits fall short of the protocol:**", ""] + [f"- {s}" for s in shortfalls]
    return lines + [""]


def counts_from_dict(stored: dict) -> LabelCounts:
    """The ``LabelCounts`` a results header stored with ``as_dict()``."""
    return LabelCounts(labels=stored["labels"], test_patients=stored["test_patients"],
                       test_positives=stored["test_positives"],
                       train={float(k): v for k, v in stored["train"].items()},
                       val={float(k): v for k, v in stored["val"].items()},
                       headline=stored["headline_labels"], excluded=stored["excluded_labels"])


__all__ = ["LabelCounts", "MIN_TEST_PATIENTS", "MIN_TEST_POSITIVES", "counts_from_dict", "label_counts",
           "low_label_shortfalls", "protocol_lines", "short_test_set"]
