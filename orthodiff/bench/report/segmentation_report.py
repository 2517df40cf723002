"""The report's segmentation part: mean Dice per method and fraction with paired differences, the
aims against the supervised reference, and per-structure tables (Dice and HD95 of every structure,
the whole-volume mean and the thin-structure mean, mean ± SD over seeds, read from each cell's
evaluation ``<run_dir>/eval/metrics.json``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...fileio import read_json
from ..presets import PRETRAINED_METHODS
from .curves import FLAT_VALIDATION_GAIN, last_quarter_gain
from .results import Pooler, clearly_above, fmt, fmt_diff, fmt_pooled, select


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


# The benchmark's segmentation aims: the supervised reference at 100% of the labels, and orthodiff against it.
REFERENCE = "dynunet"
REFERENCE_AIMS = {"femur": 0.90, "tibia": 0.90, "mean": 0.60}
WITHIN_AT_FULL = 0.02


def segmentation_section(rows: list, pooler: Pooler, methods: list, root: Path,
                         reference: str = REFERENCE) -> tuple[list[str], dict]:
    """The report's segmentation part: mean Dice per method and fraction, paired differences of the
    pretrained methods from the others, the aims against ``reference`` and the per-structure tables.
    Returns the lines and {method: [(fraction, Pooled), ...]} for the plot."""
    methods = [m for m in methods if select(rows, task="segment", method=m)]
    if not methods:
        return [], {}
    fractions = sorted({r["fraction"] for r in rows if r["task"] == "segment"}, reverse=True)

    def cells(method, fraction):
        return select(rows, task="segment", method=method, fraction=fraction)

    lines = ["", "## Segmentation: mean Dice over structures (test patients)", "",
             "| method | " + " | ".join(f"{f:.0%}" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    series = {}
    for method in methods:
        series[method] = [(f, pooler.pooled(cells(method, f))) for f in fractions]
        lines.append(f"| {method} | " + " | ".join(fmt_pooled(p) for _, p in series[method]) + " |")
    mine = [m for m in methods if m in PRETRAINED_METHODS]
    for a in mine:
        for b in [m for m in methods if m not in mine]:
            lines += ["", f"Paired difference {a} - {b}: " + ", ".join(
                f"{f:.0%} {fmt_diff(pooler.difference(cells(a, f), cells(b, f)))}" for f in fractions) + "."]
    lines += _aim_lines(pooler, cells, mine, reference, fractions, root)
    lines += structure_lines(rows, root, methods, fractions)
    return lines, series


def _aim_lines(pooler: Pooler, cells, mine: list, reference: str, fractions: list, root: Path) -> list[str]:
    """Whether each aim is met, in words: the reference's Dice at 100% of the labels, orthodiff
    within 0.02 of it there and above it at 10% (or the lowest fraction) beyond the interval."""
    high = 1.0  # the aims are set at 100%; a run without it (a low-label study) is not judged
    low = 0.1 if 0.1 in fractions else min(fractions)
    at_high = cells(reference, high)
    if not at_high:
        return ["", f"Aims: not judged; they need {reference} (the supervised reference) at 100% of the labels."]
    wanted = ", ".join(f"{name} Dice >= {aim:.2f}" for name, aim in REFERENCE_AIMS.items())
    beyond = f" and above it at {low:.0%} by more than the interval" if low < high else ""
    lines = ["", (f"Aims of the benchmark: {reference} at {high:.0%} reaches {wanted}; orthodiff within "
                  f"{WITHIN_AT_FULL} of it at {high:.0%}{beyond}."), ""]
    per_structure = [found for found in (structure_metrics(r, root) for r in at_high) if found]
    reached = {name: _seed_mean([f.get(name, {}).get("dice") for f in per_structure])
               for name in REFERENCE_AIMS if name != "mean"}
    reached["mean"] = pooler.pooled(at_high).value  # the value the table above shows
    lines.append(f"- {reference} at {high:.0%}: " + ", ".join(
        f"{name} {fmt({'value': reached[name]})} ({'met' if reached[name] is not None and reached[name] >= aim else 'NOT met'})"
        for name, aim in REFERENCE_AIMS.items()) + ".")
    for method in mine:
        gap = pooler.difference(cells(method, high), at_high)
        within = gap is not None and gap["value"] >= -WITHIN_AT_FULL
        verdict = (f"- {method}: {'within' if within else 'NOT within'} {WITHIN_AT_FULL} of {reference} at "
                   f"{high:.0%} (difference {fmt_diff(gap)})")
        if low < high:
            above = pooler.difference(cells(method, low), cells(reference, low))
            verdict += (f"; at {low:.0%} {'' if clearly_above(above) else 'NOT '}above it by more than the interval "
                        f"(difference {fmt_diff(above)})")
        lines.append(verdict + ".")
    judged = [(reference, high), *((m, high) for m in mine)]
    if low < high:
        judged += [(reference, low), *((m, low) for m in mine)]
    lines += _convergence_verdict(cells, judged)
    return lines


def _convergence_verdict(cells, judged: list) -> list[str]:
    """Whether the cells the aims were judged on had converged: a verdict on cells whose validation
    Dice still rose at the end of the budget holds at that budget only."""
    gains = {}
    for method, fraction in judged:
        found = [g for g in (last_quarter_gain(r.get("val_curve")) for r in cells(method, fraction)) if g is not None]
        if found:
            gains[(method, fraction)] = float(np.mean(found))
    if not gains:
        return []
    listed = ", ".join(f"{method} at {fraction:.0%} {gain:+.3f}" for (method, fraction), gain in gains.items())
    rising = [f"{method} at {fraction:.0%}" for (method, fraction), gain in gains.items() if gain >= FLAT_VALIDATION_GAIN]
    verdict = (f"still rising, so not converged: {', '.join(rising)}; a verdict on them holds at this step budget only"
               if rising else "every judged cell had flattened")
    return [f"- Convergence (validation Dice gained over the last quarter of the steps, mean over seeds; flat: "
            f"under {FLAT_VALIDATION_GAIN}): {listed}; {verdict}."]


def _seed_mean(values: list) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _mean_sd(values: list, digits: int) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


__all__ = ["segmentation_section", "structure_lines", "structure_metrics"]
