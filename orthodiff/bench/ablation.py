"""The report's feature ablation, read from what the grid probes already trained: every plane's
one-plane probe on each (block, timestep), pretrained and on untrained denoisers, scored by
validation macro AUROC (the score the grid chooses by), mean over seeds at each fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import read_json

PROBES = ("orthodiff-probe", "orthodiff-probe-random-init")


def grid_scores(rows: list, root: Path) -> dict:
    """{(method, fraction): {(plane, "block@t"): [validation AUROC per seed]}} from the grid records
    in the probe cells' run.json files."""
    scores: dict = {}
    for row in rows:
        if row.get("task") != "classify" or row.get("method") not in PROBES:
            continue
        path = Path(root) / row["run_dir"] / "run.json"
        grid = (read_json(path).get("grid") or {}) if path.exists() else {}
        for plane, record in (grid.get("planes") or {}).items():
            for key, value in (record.get("scores") or {}).items():
                if value is not None:
                    scores.setdefault((row["method"], row["fraction"]), {}).setdefault((plane, key), []).append(value)
    return scores


def ablation_lines(rows: list, root: Path) -> list[str]:
    """A table per fraction: rows (plane, block@t), columns pretrained and untrained, with how
    often each was chosen; empty when no grid probe ran."""
    scores = grid_scores(rows, root)
    if not scores:
        return []
    fractions = sorted({f for _, f in scores}, reverse=True)
    lines = ["", "## Ablation: block and timestep per plane (validation macro AUROC of one-plane probes)", "",
             ("Each grid probe trains one probe per plane, (block, timestep) and learning rate, and keeps the best "
              "validation AUROC; the table gives its mean over seeds. Validation sets are the fraction's own "
              "(small at 10%), so these numbers choose features, they do not rank methods."), ""]
    for fraction in fractions:
        pretrained = scores.get((PROBES[0], fraction), {})
        untrained = scores.get((PROBES[1], fraction), {})
        keys = sorted(set(pretrained) | set(untrained))
        lines += [f"At {fraction:.0%} of the labels:", "",
                  "| plane | block@timestep | pretrained | untrained | difference |", "|---|---|---|---|---|"]
        for plane, key in keys:
            a, b = pretrained.get((plane, key)), untrained.get((plane, key))
            mean_a = float(np.mean(a)) if a else None
            mean_b = float(np.mean(b)) if b else None
            diff = f"{mean_a - mean_b:+.3f}" if mean_a is not None and mean_b is not None else "-"
            lines.append(f"| {plane} | {key} | {_fmt(mean_a, a)} | {_fmt(mean_b, b)} | {diff} |")
        lines.append("")
    return lines


def _fmt(mean, values) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f} (n={len(values)})"


__all__ = ["ablation_lines", "grid_scores"]
