"""What every bench report says about how its cells trained: steps and training loss per method
and fraction (did it settle?), and the time the cells took."""

from __future__ import annotations

from pathlib import Path

from .curves import FLAT_VALIDATION_GAIN, last_quarter, last_quarter_gain


def convergence_lines(rows: list, name: str = "") -> list[str]:
    """Per method and fraction: steps, and the last against the best training loss (mean over seeds);
    a last loss far above the best says training stopped before it settled. ``name`` tells apart the
    tables of one report (a joint, a scenario)."""
    import numpy as np

    keyed = {}
    for row in rows:
        keyed.setdefault((row["task"], row["method"], row["fraction"]), []).append(row)
    if not any(r.get("loss_curve") for r in rows):
        return []
    lines = ["", f"## Convergence (training loss, mean over seeds){f': {name}' if name else ''}", "",
             "| task | method | fraction | steps | train patients | first loss | best loss | last loss |",
             "|---|---|---|---|---|---|---|---|"]
    for (task, method, fraction), chosen in keyed.items():
        curves = [r["loss_curve"] for r in chosen if r.get("loss_curve")]
        if not curves:
            continue
        steps = [r["steps"] for r in chosen if r.get("steps") is not None]
        patients = [r.get("patients", {}).get("train") for r in chosen if r.get("patients", {}).get("train")]
        first, best, last = (float(np.mean([f(c) for c in curves])) for f in (
            lambda c: c[0][1], lambda c: min(v for _, v in c), lambda c: c[-1][1]))
        lines.append(f"| {task} | {method} | {fraction:.0%} | {int(np.mean(steps)) if steps else '-'} | "
                     f"{int(np.mean(patients)) if patients else '-'} | {first:.3f} | {best:.3f} | {last:.3f} |")
    return lines


def timing_line(rows) -> str:
    total = sum(r.get("train_seconds", 0.0) for r in rows)
    return f"Training time over all cells: {total / 60:.1f} min (excluding data preparation and pretraining)."


def training_sections(groups: dict, pools: dict, out: Path) -> tuple[list[str], list[Path]]:
    """Report lines and pictures for a bench whose cells fall into named groups (joints, scenarios):
    a convergence table and loss curves per group, then the held-out curve of each pretraining in
    ``pools`` (the results header's ``unlabeled_pools``)."""
    from . import plots
    from .pretraining_report import pretraining_section

    lines, files = [], []
    for name, rows in groups.items():
        lines += convergence_lines(rows, name)
        files.append(plots.loss_curves(rows, Path(out) / f"{name}_loss_curves.png"))
    lines.append("")
    for name, pool in pools.items():
        section, picture = pretraining_section(pool.get("pretraining"), out, name)
        lines += section
        files.append(picture)
    return lines, [f for f in files if f is not None]


def write_grouped_report(lines: list[str], files: list[Path], groups: dict, pools: dict, rows: list,
                         out: Path) -> tuple[Path, list[Path]]:
    """Close a grouped bench's report (cross-joint, robustness): the training sections of ``groups``
    and ``pools``, every picture and the training time. Writes ``out/report.md``; returns its path
    and all the pictures."""
    from ...fileio import write_text

    sections, pictures = training_sections(groups, pools, out)
    files = list(files) + pictures
    lines = lines + sections + ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in files]
    lines += ["", timing_line(rows)]
    write_text(Path(out) / "report.md", "\n".join(lines) + "\n")
    return Path(out) / "report.md", files


__all__ = ["FLAT_VALIDATION_GAIN", "convergence_lines", "last_quarter", "last_quarter_gain", "timing_line",
           "training_sections", "write_grouped_report"]
