"""A picture a person can check: three-plane slices of a few synthetic subjects, with and without each label."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..planes import PLANES
from .abnormalities import JOINT_LABELS
from .population import sample_population
from .study import render_study


def _display(image: np.ndarray, k: int) -> np.ndarray:
    """Slice k as rows x columns, the way a viewer shows a series (first row at the top)."""
    return image[:, :, k].T


def write_preview(path, joint: str = "knee", seed: int = 0, subjects: int = 3, matrix: int = 128) -> Path:
    """PNG of the archive's first ``subjects`` patients: a normal row each (mid-slices), then one row
    per label on one of them, each plane at the slice where the label changes the image most."""
    from ..plotting import pyplot, save_png

    specs = sample_population(joint, subjects, seed)
    normals = [spec.with_labels(**dict.fromkeys(spec.labels, 0)) for spec in specs]
    rendered = [render_study(spec, matrix) for spec in normals]
    rows = [(f"{spec.study_id} normal", series, None) for spec, series in zip(normals, rendered)]
    for index, label in enumerate(JOINT_LABELS[joint]):
        which = index % len(normals)
        rows.append((f"{normals[which].study_id} {label}", render_study(normals[which].with_labels(**{label: 1}), matrix),
                     rendered[which]))

    plt = pyplot()
    fig, axes = plt.subplots(len(rows), len(PLANES), figsize=(2.3 * len(PLANES), 2.4 * len(rows)), squeeze=False)
    for r, (title, series, reference) in enumerate(rows):
        for c, plane in enumerate(PLANES):
            ax = axes[r, c]
            ax.axis("off")
            if plane not in series:
                continue
            image = series[plane].image.astype(np.float32)
            k = image.shape[2] // 2
            if reference is not None and plane in reference:
                change = np.abs(image - reference[plane].image).sum(axis=(0, 1))
                k = int(np.argmax(change)) if change.max() > 0 else k
            shown = _display(image, k)
            ax.imshow(shown, cmap="gray", vmin=0, vmax=float(np.percentile(image, 99.8)) or 1.0, interpolation="nearest")
            ax.set_title(f"{title}\n{plane} slice {k + 1}/{image.shape[2]}", fontsize=6)
    fig.tight_layout()
    return save_png(fig, Path(path))
