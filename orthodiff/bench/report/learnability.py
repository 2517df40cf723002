"""How learnable each headline label is on this data: the best AUROC any method reaches with every
training label (the ceiling) beside the raw-voxel probe (the floor).

A label whose ceiling stays below ``NO_HEADROOM_BELOW`` is named "no headroom": no method learns it
well even with all labels, so a comparison at fewer labels says little about it (the lesion may be
too small for the plane size, or cut off by the field of view). Every bench report shows the table,
computed from its per-cell results rows alone (seed means of each row's per-label test AUROC).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_HEADROOM_BELOW = 0.7
FLOOR_METHOD = "raw-voxels"


@dataclass
class LabelCeiling:
    """One label's row of the table: seed-mean test AUROCs at the highest label fraction."""

    label: str
    best_method: str | None
    best_auroc: float | None
    floor_auroc: float | None  # the raw-voxel probe; None when it did not run

    def no_headroom(self, bar: float = NO_HEADROOM_BELOW) -> bool:
        return self.best_auroc is not None and self.best_auroc < bar


def learnability(rows: list, labels: list | None = None) -> tuple[float | None, list[LabelCeiling]]:
    """The highest label fraction of the diagnosis rows and, per label (``labels``, else every label of
    the rows), the method with the highest seed-mean AUROC there and the raw-voxel probe's."""
    rows = [row for row in rows if row.get("task") == "classify" and row.get("auroc")]
    if not rows:
        return None, []
    fraction = max(float(row["fraction"]) for row in rows)
    at_full = [row for row in rows if float(row["fraction"]) == fraction]
    if labels is None:
        labels = list(dict.fromkeys(label for row in at_full for label in row["auroc"]))
    methods = list(dict.fromkeys(row["method"] for row in at_full))
    table = []
    for label in labels:
        means = {method: _seed_mean(at_full, method, label) for method in methods}
        scored = {method: value for method, value in means.items() if value is not None}
        best = max(scored, key=scored.get) if scored else None
        table.append(LabelCeiling(label, best, scored.get(best), means.get(FLOOR_METHOD)))
    return fraction, table


def _seed_mean(rows: list, method: str, label: str) -> float | None:
    values = [row["auroc"][label]["value"] for row in rows
              if row["method"] == method and (row["auroc"].get(label) or {}).get("value") is not None]
    return float(np.mean(values)) if values else None


def learnability_lines(rows: list, labels: list | None = None, name: str = "",
                       bar: float = NO_HEADROOM_BELOW) -> list[str]:
    """The report section: the ceiling and the floor per label, and the labels with no headroom."""
    fraction, table = learnability(rows, labels)
    if not table:
        return []
    lines = [f"## Learnability: the ceiling per label{f': {name}' if name else ''}", "",
             (f"Test AUROC (mean over seeds) of the best method trained on {fraction:.0%} of the training labels, "
              f"beside the raw-voxel probe ({FLOOR_METHOD}). A ceiling below {bar:.2f} leaves no headroom: no "
              "method learns that label well here, so differences at fewer labels say little about it."), "",
             "| label | best method | best AUROC | raw-voxel probe | best - raw |", "|---|---|---|---|---|"]
    for entry in table:
        gap = (f"{entry.best_auroc - entry.floor_auroc:+.3f}"
               if entry.best_auroc is not None and entry.floor_auroc is not None else "-")
        lines.append(f"| {entry.label} | {entry.best_method or '-'} | {_value(entry.best_auroc)} | "
                     f"{_value(entry.floor_auroc)} | {gap} |")
    short = [entry for entry in table if entry.no_headroom(bar)]
    lines.append("")
    if short:
        lines.append(f"No headroom (ceiling below {bar:.2f}): " + ", ".join(
            f"{entry.label} ({entry.best_method} {entry.best_auroc:.3f})" for entry in short) + ".")
    else:
        lines.append(f"Every label's ceiling reaches {bar:.2f}.")
    return lines + [""]


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


__all__ = ["FLOOR_METHOD", "NO_HEADROOM_BELOW", "LabelCeiling", "learnability", "learnability_lines"]
