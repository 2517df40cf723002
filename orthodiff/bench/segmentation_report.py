"""The report's per-structure segmentation tables: Dice and HD95 of every structure, the
whole-volume mean and the thin-structure mean, for each method at each fraction, mean ± SD over
seeds, read from each cell's evaluation (``<run_dir>/eval/metrics.json``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import read_json


def structure_metrics(row: dict, root: Path) -> dict | None:
    """{structure | "mean" | "thin mean": {"dice": v, "hd95_mm": v}} of one segmentation cell."""
    path = Path(root) / row["run_dir"] / "eval" / "metrics.json"
    if not path.exists():
        return None
    overall = read_json(path)["segmentation"]["overall"]
    entries = dict(overall["structures"])
    entries["mean"] = overall["mean"]
    if "thin_mean" in overall:
        entries["thin mean"] = overall["thin_mean"]
    return {name: {metric: (entry.get(metric) or {}).get("value") for metric in ("dice", "hd95_mm")}
            for name, entry in entries.items()}


def structure_lines(rows: list, root: Path, methods: list, fractions: list) -> list[str]:
    """Two tables (Dice, HD95 in mm): a row per method and fraction, a column per structure."""
    cells = {}
    for row in rows:
        if row.get("task") == "segment" and row["method"] in methods and row["fraction"] in fractions:
            found = structure_metrics(row, root)
            if found:
                cells.setdefault((row["method"], row["fraction"]), []).append(found)
    if not cells:
        return []
    names = list(next(iter(cells.values()))[0])
    lines = []
    for metric, title, digits in (("dice", "Dice", 3), ("hd95_mm", "HD95 (mm)", 1)):
        lines += ["", f"## Segmentation per structure: {title} (test patients, mean ± SD over seeds)", "",
                  "| method | labels | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for fraction in fractions:
            for method in methods:
                found = cells.get((method, fraction))
                if not found:
                    continue
                values = [_mean_sd([f[name][metric] for f in found if f.get(name)], digits) for name in names]
                lines.append(f"| {method} | {fraction:.0%} | " + " | ".join(values) + " |")
    return lines


def _mean_sd(values: list, digits: int) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


__all__ = ["structure_lines", "structure_metrics"]
