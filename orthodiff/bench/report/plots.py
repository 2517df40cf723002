"""Bench figures: a metric versus the label fraction with interval bands, grouped bars, and the
cells' training-loss curves."""

from __future__ import annotations

from pathlib import Path

from ...plotting import pyplot, save_png


def metric_vs_fraction(series: dict, ylabel: str, title: str, path: Path, chance=None) -> Path:
    """``series``: {method: [(fraction, Pooled), ...]}: a line per method, its 95% interval as a band;
    ``chance`` draws the value a random guess scores (0.5 for AUROC)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, points in series.items():
        points = sorted((f, p) for f, p in points if p.value is not None)
        if not points:
            continue
        xs = [100 * f for f, _ in points]
        ys = [p.value for _, p in points]
        line, = ax.plot(xs, ys, marker="o", label=method)
        banded = [(x, p) for x, (_, p) in zip(xs, points) if p.ci_low is not None]
        if banded:
            ax.fill_between([x for x, _ in banded], [p.ci_low for _, p in banded], [p.ci_high for _, p in banded],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    if chance is not None:
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xticks([5, 10, 25, 50, 100])
    ax.set_xticklabels(["5%", "10%", "25%", "50%", "100%"])
    ax.set_xlabel("training labels (fraction of training patients)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def grouped_bars(groups: dict, ylabel: str, title: str, path: Path) -> Path:
    """``groups``: {group name: {method: (value, low, high)}}: bars per method within each group."""
    import numpy as np

    plt = pyplot()
    names = list(groups)
    methods = list(dict.fromkeys(m for g in groups.values() for m in g))  # first-seen order
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) + 2), 4.5))
    for k, method in enumerate(methods):
        xs, ys, errs = [], [], [[], []]
        for i, name in enumerate(names):
            value = groups[name].get(method)
            if not value or value[0] is None:
                continue
            xs.append(i + (k - (len(methods) - 1) / 2) * width)
            ys.append(value[0])
            low, high = value[1], value[2]
            errs[0].append(value[0] - low if low is not None else 0.0)
            errs[1].append(high - value[0] if high is not None else 0.0)
        ax.bar(xs, ys, width=width, yerr=np.array(errs) if xs else None, capsize=2, label=method)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, path)


def loss_curves(rows: list, path: Path) -> Path | None:
    """One panel per (task, method): every cell's training loss against its steps (or epochs), coloured
    by label fraction, so a curve still falling at its end shows a run stopped before converging.
    None when no row has a curve."""
    import math

    panels = {}
    for row in rows:
        if row.get("loss_curve"):
            panels.setdefault(f"{row['task']}: {row['method']}", []).append(row)
    if not panels:
        return None
    plt = pyplot()
    columns = min(3, len(panels))
    lines = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False)
    fractions = sorted({r["fraction"] for group in panels.values() for r in group}, reverse=True)
    colours = {f: plt.cm.viridis(i / max(1, len(fractions) - 1)) for i, f in enumerate(fractions)}
    for ax, (title, group) in zip(axes.flat, panels.items()):
        shown = set()
        for row in group:
            xs, ys = zip(*row["loss_curve"])
            label = f"{row['fraction']:.0%}" if row["fraction"] not in shown else None
            shown.add(row["fraction"])
            ax.plot(xs, ys, color=colours[row["fraction"]], alpha=0.7, linewidth=1, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step (epoch where steps are not logged)", fontsize=7)
        ax.set_ylabel("training loss", fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save_png(fig, path)
