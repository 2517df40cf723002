"""PNG plots of an evaluation: ROC curves per label, reliability diagram, Dice per structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..plotting import pyplot, save_png
from .bootstrap import calibration_bins
from .classification import N_BINS, class_balance_reason, patient_scores


def roc_curves(frame: pd.DataFrame, labels: list[str], metrics: dict, path: Path) -> Path:
    """One ROC curve per label (patient level); labels without both classes are named in the title."""
    import torch
    from torchmetrics.functional.classification import binary_roc

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    skipped = []
    for label in labels:
        _, scores, targets = patient_scores(frame, label)
        if class_balance_reason(targets) is not None:
            skipped.append(label)
            continue
        fpr, tpr, _ = binary_roc(torch.tensor(scores), torch.tensor(targets))
        auroc = metrics["labels"][label]["auroc"]["value"]
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{label} ({auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    title = "ROC per label (AUROC)"
    if skipped:
        title += f"\nnot drawn (one class only): {', '.join(skipped)}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path)


def reliability_diagram(frame: pd.DataFrame, labels: list[str], path: Path) -> Path:
    """Observed positive rate against mean predicted probability per bin, one line per label."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label in labels:
        _, scores, targets = patient_scores(frame, label)
        if scores.size == 0:
            continue
        bins = np.minimum(calibration_bins(scores, N_BINS), N_BINS - 1)
        used = np.unique(bins)
        confidence = [scores[bins == b].mean() for b in used]
        observed = [targets[bins == b].mean() for b in used]
        ax.plot(confidence, observed, marker="o", markersize=3, label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="mean predicted probability", ylabel="observed positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"Reliability ({N_BINS} bins, patient level)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return save_png(fig, path)


def dice_per_structure(metrics: dict, path: Path) -> Path:
    """Mean Dice per structure with its 95% bootstrap interval."""
    plt = pyplot()
    names = [n for n, e in metrics["structures"].items() if e["dice"]["value"] is not None]
    values = np.array([metrics["structures"][n]["dice"]["value"] for n in names])
    low = np.array([_bound(metrics["structures"][n]["dice"], "ci_low") for n in names])
    high = np.array([_bound(metrics["structures"][n]["dice"], "ci_high") for n in names])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 1.5), 4))
    positions = np.arange(len(names))
    ax.bar(positions, values, color="tab:blue", alpha=0.8)
    ax.errorbar(positions, values, yerr=[values - low, high - values], fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(positions, names, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="Dice", ylim=(0, 1.02))
    title = "Dice per structure (95% patient bootstrap)"
    undrawn = [n for n, e in metrics["structures"].items() if e["dice"]["value"] is None]
    if undrawn:
        title += f"\nnot drawn (absent from every target): {', '.join(undrawn)}"
    ax.set_title(title, fontsize=9)
    return save_png(fig, path)


def _bound(entry: dict, key: str) -> float:
    """An interval bound, or the point value when the interval is undefined."""
    value = entry.get(key)
    return entry["value"] if value is None else value


def segmentation_overlays(examples: list[dict], classes: list[str], path: Path) -> Path:
    """One row per example: the plane tensor's middle slice, the reference and the prediction over it.

    Each example holds ``title``, ``image`` (D, H, W), ``target`` and ``pred`` (D, H, W label arrays).
    The slice shown is the one where the reference holds most foreground, so the structures are in view.
    """
    plt = pyplot()
    from matplotlib.colors import ListedColormap

    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[: max(1, len(classes) - 1)]
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 3 * len(examples)), squeeze=False)
    for row, example in zip(axes, examples):
        target, pred = np.asarray(example["target"]), np.asarray(example["pred"])
        index = int(np.argmax((target > 0).reshape(target.shape[0], -1).sum(axis=1)))
        image = np.asarray(example["image"], dtype=np.float32)[index]
        for ax, labels, title in zip(row, (None, target[index], pred[index]), ("image", "reference", "prediction")):
            ax.imshow(image, cmap="gray")
            if labels is not None:
                ax.imshow(np.ma.masked_equal(labels, 0), cmap=cmap, vmin=1, vmax=max(1, len(classes) - 1),
                          alpha=0.55, interpolation="nearest")
            ax.set_title(f"{example['title']}: {title} (slice {index + 1}/{target.shape[0]})", fontsize=8)
            ax.axis("off")
    return save_png(fig, path)
